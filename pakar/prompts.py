"""The retrieval prompt template (Indonesian), and reading-comprehension records rendered with it.

Standard library only: the corpus reader renders {"context", "question", "answer"} records as
conversations with it (pakar.corpus), and pakar.rag asks questions with it, so neither imports the other.
"""

from __future__ import annotations

from pakar import PakarError

NO_ANSWER = "Maaf, jawabannya tidak ada di sumber."


INSTRUCTION = f'Jawab pertanyaan berdasarkan sumber berikut. Jika jawabannya tidak ada di sumber, jawab: "{NO_ANSWER}"'


def render_rag_prompt(question: str, passages: list[str]) -> str:
    sources = "".join(f"[{i}] {p.strip()}\n\n" for i, p in enumerate(passages, 1))
    return f"{INSTRUCTION}\n\n{sources}Pertanyaan: {question.strip()}"


def rc_messages(record: dict) -> list[dict]:
    """A reading-comprehension record as the conversation fine-tuning learns from (template above)."""
    context, question, answer = record.get("context"), record.get("question"), record.get("answer")
    if isinstance(context, str):
        context = [context]
    if not (isinstance(context, list) and context and all(isinstance(c, str) and c.strip() for c in context)):
        raise PakarError("reading-comprehension record: 'context' must be a non-empty string or list of strings")
    if not isinstance(question, str) or not question.strip():
        raise PakarError("reading-comprehension record: 'question' must be a non-empty string")
    if answer is not None and not isinstance(answer, str):
        raise PakarError("reading-comprehension record: 'answer' must be a string (\"\" = not answerable)")
    reply = answer.strip() if answer and answer.strip() else NO_ANSWER
    return [{"role": "user", "content": render_rag_prompt(question, context)},
            {"role": "assistant", "content": reply}]
