#!/usr/bin/env bash
# Multi-node pre-training under SLURM: one torchrun per node, rendezvous on the allocation's first node.
#
#   sbatch --nodes 2 --gpus-per-node 8 scripts/slurm_pretrain.sh --data /shared/DATA --out /shared/RUN --model base
#
# Arguments go to `bertforge pretrain`; DATA and RUN must be on a filesystem every node sees. If the job was
# stopped (time limit, scancel), submit it again with --resume added: it continues from the last checkpoint.
#SBATCH --job-name=bertforge-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail

# One process per GPU; on CPU-only nodes one process per node (it uses all of the task's cores).
PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-1} / PROCS_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-1} / PROCS_PER_NODE : 1 ))}

echo "bertforge: $SLURM_JOB_NUM_NODES nodes x $PROCS_PER_NODE processes, rendezvous $HEAD_NODE:$PORT"
# --kill-on-bad-exit: a node whose torchrun fails ends the job step on every node.
# exec so that SLURM's SIGTERM reaches srun, which forwards it to torchrun and the workers (one checkpoint).
exec srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$PROCS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:$PORT" --rdzv-id "$SLURM_JOB_ID" \
    -m bertforge pretrain "$@"
