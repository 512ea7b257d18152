"""--tasks FILE.jsonl: questions from a local file, one JSON object a line.

    {"question": "...", "choices": ["...", "..."], "answer": 1}   multiple choice (answer: an index, or the
                                                                  text of one of the choices)
    {"prompt": "...", "answer": "..."}                            exact match of a greedy completion

Multiple choice is scored as lm-evaluation-harness's multiple_choice tasks are: each choice's log-likelihood
after the question (" " + choice as the continuation); acc picks the most likely, acc_norm the most likely per
character of the choice. Exact match: the first line of the greedy completion, stripped, equals the answer,
stripped. A chat model (one with a saved chat template) gets the question or prompt as a user turn and
answers through its template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.core.errors import UserError
from finetune.infer.sampling import chat_prompt_ids

from .scoring import Result, Scorer
from .windows import continuation_window

TARGET_DELIMITER = " "  # lm-eval's default between a question and a choice
MAX_NEW_TOKENS = 32     # of an exact-match completion


@dataclass
class Question:
    where: str
    text: str
    choices: list[str] | None  # None: exact match
    answer: int | str


def read_tasks(path: Path) -> list[Question]:
    """Every question of a task file; a bad line is one UserError naming the file and line."""
    hint_format = ('each line is {"question": ..., "choices": [...], "answer": INDEX} or '
                   '{"prompt": ..., "answer": "..."}')
    if not path.is_file():
        raise UserError(f"--tasks {path} {'is not a file' if path.exists() else 'does not exist'}. HINT: pass a "
                        f"JSONL file where {hint_format}")
    questions = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--tasks {path} is not UTF-8 text. HINT: save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            questions.append(parse_question(line, f"{path} line {number}", hint_format))
    if not questions:
        raise UserError(f"--tasks {path} holds no question. HINT: {hint_format}")
    return questions


def parse_question(line: str, where: str, hint_format: str) -> Question:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}). HINT: {hint_format}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: the line is not a JSON object. HINT: {hint_format}")
    if "choices" in obj or "question" in obj:
        return multiple_choice(obj, where, hint_format)
    if "prompt" in obj:
        prompt, answer = obj.get("prompt"), obj.get("answer")
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(answer, str):
            raise UserError(f"{where}: an exact-match line needs a non-empty text 'prompt' and a text 'answer'. "
                            f"HINT: {hint_format}")
        return Question(where, prompt, None, answer)
    raise UserError(f"{where}: the line has neither 'question' + 'choices' nor 'prompt'. HINT: {hint_format}")


def multiple_choice(obj: dict, where: str, hint_format: str) -> Question:
    question, choices, answer = obj.get("question"), obj.get("choices"), obj.get("answer")
    if not isinstance(question, str):
        raise UserError(f"{where}: 'question' must be text. HINT: {hint_format}")
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}: 'choices' is empty or not a list, so there is nothing to choose from. HINT: give "
                        "at least two choices as a list of strings")
    if not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{where}: every choice must be a non-empty string. HINT: fix 'choices' on that line")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{where}: 'answer' {json.dumps(answer)} is out of range for {len(choices)} choices. HINT: give "
                        f"the index of the right choice, 0 to {len(choices) - 1}, or its text")
    return Question(where, question, choices, answer)


class TaskEvaluation:
    kind = "tasks"

    def __init__(self, name: str, questions: list[Question]):
        self.name, self.questions = name, questions

    def run(self, scorer: Scorer) -> Result:
        chat = bool(getattr(scorer.tokenizer, "chat_template", None))
        mc = [q for q in self.questions if q.choices is not None]
        em = [q for q in self.questions if q.choices is None]
        figures: dict = {"questions": len(self.questions)}
        documents = []
        if mc:
            correct, correct_norm, rows = score_multiple_choice(scorer, mc, chat)
            figures.update(acc=float(np.mean(correct)), acc_norm=float(np.mean(correct_norm)),
                           multiple_choice=len(mc))
            documents += rows
        if em:
            answers = greedy_answers(scorer, em, chat)
            matches = [answer == q.answer.strip() for q, answer in zip(em, answers)]
            documents += [{"input": self.name, "name": q.where, "answer": answer, "correct": match}
                          for q, answer, match in zip(em, answers, matches)]
            figures.update(exact_match=float(np.mean(matches)), exact_match_questions=len(em))
        return Result(figures, documents=documents)

    def most_shares(self, context: int) -> int:
        """The most processes that can get work: a batch of one choice each, or an exact-match question."""
        return sum(len(q.choices) if q.choices is not None else 1 for q in self.questions)


def greedy_answers(scorer: Scorer, questions: list[Question], chat: bool) -> list[str]:
    """The first line of each question's greedy completion; in several processes, question i is completed by
    process i mod N and the answers are gathered."""
    mine = {}
    for i, q in enumerate(questions):
        if scorer.shard.owns_item(i):
            prompt = (chat_prompt_ids(scorer.tokenizer, [{"role": "user", "content": q.text}]) if chat
                      else scorer.encode(q.text))
            mine[i] = first_line(scorer.greedy_completion(prompt, MAX_NEW_TOKENS))
    answers = {}
    for part in scorer.shard.gather(mine):
        answers.update(part)
    return [answers[i] for i in range(len(questions))]


def first_line(completion: str) -> str:
    stripped = completion.strip()
    return stripped.splitlines()[0].strip() if stripped else ""


def encode_pair(scorer: Scorer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of context + continuation into ids: trailing spaces of the context move to the
    continuation, the pair is encoded whole and the continuation is what follows the context's own ids."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [scorer.prefix_token_id], scorer.encode(continuation)
    whole, context_ids = scorer.encode(context + continuation), scorer.encode(context)
    return context_ids, whole[len(context_ids):]


def score_multiple_choice(scorer: Scorer, questions: list[Question], chat: bool):
    windows, spans = [], []
    for q in questions:
        first = len(windows)
        for choice in q.choices:
            if chat:
                context = chat_prompt_ids(scorer.tokenizer, [{"role": "user", "content": q.text}])
                continuation = scorer.encode(choice)
            else:
                context, continuation = encode_pair(scorer, q.text, TARGET_DELIMITER + choice)
            windows.append(continuation_window(context, continuation, scorer.context))
        spans.append((first, len(windows)))
    # in several processes each choice is scored by one of them, the others add 0 (parallel.py)
    loglikelihoods = scorer.shard.sum(np.array([lp.sum() for lp in scorer.target_logprobs(windows)])).tolist()
    correct, correct_norm, rows = [], [], []
    for q, (first, end) in zip(questions, spans):
        lls = np.array(loglikelihoods[first:end])
        lengths = np.array([float(len(c)) for c in q.choices])
        correct.append(int(np.argmax(lls)) == q.answer)
        correct_norm.append(int(np.argmax(lls / lengths)) == q.answer)
        rows.append({"input": "", "name": q.where, "loglikelihoods": lls.tolist(), "correct": correct[-1],
                     "correct_norm": correct_norm[-1]})
    return correct, correct_norm, rows
