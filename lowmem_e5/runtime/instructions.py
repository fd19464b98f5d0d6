"""Input format of the official E5 evaluation: instructed queries, plain documents."""

from __future__ import annotations

from ..errors import InputError

# Instructions of the official evaluation (microsoft/unilm e5/utils.py), by MTEB task name.
TASK_INSTRUCTIONS: dict[str, str] = {
    "STS": "Retrieve semantically similar text.",
    "Summarization": "Given a news summary, retrieve other semantically similar summaries",
    "BitextMining": "Retrieve parallel sentences.",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query",
    "ArguAna": "Given a claim, find documents that refute the claim",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "CQADupstack": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
}


def task_instruction(task: str) -> str:
    """The official instruction of a named task; the error lists the valid names."""
    if task not in TASK_INSTRUCTIONS:
        raise InputError(f"unknown task {task!r}; expected one of: {', '.join(TASK_INSTRUCTIONS)} (or give a free-text instruction)")
    return TASK_INSTRUCTIONS[task]


def query_prefix(instruction: str) -> str:
    """The text that precedes every query of one instruction (shared, so it can be cached)."""
    instruction = instruction.strip()
    if not instruction:
        raise InputError("instruction is empty; expected a task name or a one-sentence task description")
    return f"Instruct: {instruction}\nQuery: "


def format_query(text: str, instruction: str) -> str:
    return query_prefix(instruction) + text


def format_document(text: str, title: str | None = None) -> str:
    """Documents carry no instruction: title + " " + text, stripped, as in the official BEIR evaluation."""
    return f"{title} {text}".strip() if title else text.strip()
