from dln_ens.data.registry import load_task, register_task, task_names
from dln_ens.data.task import Example, Task, normalize_answer

__all__ = ["Example", "Task", "load_task", "register_task", "task_names", "normalize_answer"]
