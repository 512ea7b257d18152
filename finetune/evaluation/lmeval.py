"""--lm-eval TASKS: lm-evaluation-harness run in this process on the models already loaded (its Hugging Face
backend, HFLM, takes the model instance), its figures added to the report. lm-eval is optional: without it,
one error line names the pip command."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

from finetune.core.errors import UserError, first_line

from .scoring import Result, Scorer

INSTALL = "pip install lm-eval"


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"--lm-eval runs lm-evaluation-harness, which is not installed. HINT: {INSTALL}")


def task_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError(f"--lm-eval {spec!r} names no task. HINT: pass task names separated by commas, e.g. "
                        "--lm-eval hellaswag,lambada_openai")
    return names


def check_task_names(names: list[str], include_path: str | None) -> None:
    """Unknown task names fail before any model loads (lm-eval's own index of its tasks)."""
    from lm_eval.tasks import TaskManager

    known = set(TaskManager(include_path=include_path).all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--lm-eval: lm-eval has no task {unknown[0]!r}. HINT: `lm-eval ls tasks` lists them; a "
                        f"task of your own: its YAML's folder as --lm-eval-include DIR")


def hf_evaluate_first() -> None:
    """Some lm-eval tasks `import evaluate`, meaning Hugging Face's package, which this project's evaluate.py
    would shadow (its folder is first on sys.path): import theirs, if installed, with our folder left out."""
    ours = str(Path(__file__).resolve().parents[2])
    module = sys.modules.get("evaluate")
    if module is not None and not str(getattr(module, "__file__", "")).startswith(ours):
        return
    saved, path = sys.modules.pop("evaluate", None), sys.path[:]
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != ours]
    try:
        importlib.import_module("evaluate")  # Hugging Face's package (this project's script is kept out of the path)
    except ImportError:
        if saved is not None:
            sys.modules["evaluate"] = saved
    finally:
        sys.path[:] = path


class LmEvalEvaluation:
    kind = "lm-eval"

    def __init__(self, names: list[str], include_path: str | None, limit: int | None):
        self.names, self.include_path, self.limit = names, include_path, limit
        self.name = "lm-eval: " + ", ".join(names)

    def run(self, scorer: Scorer) -> Result:
        hf_evaluate_first()
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        lm = HFLM(pretrained=scorer.model, tokenizer=scorer.tokenizer, batch_size=scorer.batch_size,
                  device=str(scorer.device))
        try:
            out = simple_evaluate(model=lm, tasks=self.names, task_manager=TaskManager(include_path=self.include_path),
                                  limit=self.limit, log_samples=False, bootstrap_iters=0)
        except (ConnectionError, OSError) as exc:
            raise UserError(f"--lm-eval: a task's data set could not be read ({type(exc).__name__}: "
                            f"{first_line(exc)}); lm-eval downloads most data sets from the Hugging Face hub. HINT: "
                            "run once where the hub can be reached (the data is cached), or use a task of your own "
                            "with local data_files") from None
        figures = {}
        for task, metrics in out["results"].items():
            for key, value in metrics.items():
                metric, _, _filter = key.partition(",")
                if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric != "sample_len":
                    figures[f"{task}/{metric}"] = float(value) if math.isfinite(value) else None
        return Result(figures)
