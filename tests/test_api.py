"""The package's public API: every name resolves to what the README says, whatever was imported first."""

import subprocess
import sys


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)


def test_every_public_name_resolves():
    import bertforge

    for name in bertforge.__all__:
        assert getattr(bertforge, name) is not None


def test_pretrain_and_finetune_stay_functions_after_their_modules_are_imported():
    # Each in a fresh interpreter: the bug only shows when the submodule is imported before the name is looked up.
    _run("import bertforge; bertforge.evaluate; assert callable(bertforge.pretrain), bertforge.pretrain")
    _run("from bertforge import PretrainConfig, pretrain; assert callable(pretrain), pretrain")
    _run("import bertforge; bertforge.FinetuneConfig; assert callable(bertforge.finetune), bertforge.finetune")
    _run("import bertforge.finetune, bertforge; from bertforge.finetune import FinetuneConfig; "
         "assert callable(bertforge.finetune) and bertforge.predict.__module__ == 'bertforge.finetune'")
