"""Fine-tuning tasks by their CLI names (an explicit dict, no registry magic)."""

from bertforge.tasks.base import Evaluation, Feature, Task, TaskOptions
from bertforge.tasks.classification import ClassificationTask
from bertforge.tasks.ner import NerTask
from bertforge.tasks.qa import QATask

TASKS: dict[str, type] = {"classify": ClassificationTask, "ner": NerTask, "qa": QATask}

__all__ = ["TASKS", "ClassificationTask", "Evaluation", "Feature", "NerTask", "QATask", "Task", "TaskOptions"]
