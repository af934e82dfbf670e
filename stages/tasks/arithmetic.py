"""The embedded reasoning task: multi-digit addition with a digit-by-digit chain of thought.

A prompt is ``a+b=``. The chain of thought has one line per digit, from the right:
``{da}+{db}+{carry}={sum:02d} {a_rest}+{b_rest} {result_so_far}``, and ends with
``#### {a+b}``. Each line copies the shrinking operands of the line before, so the model
finds the next digits beside a delimiter instead of counting positions. The chain is
several times longer than the prompt and grows with the operands, so a damaged model's
longer, rambling outputs are measurable.
"""

import random
import re

from stages.tasks.base import Problem

ALPHABET = "0123456789+=# \n.abcdefghijklmnopqrstuvwxyz"
MIN_DIGITS, MAX_DIGITS = 2, 6
_ANSWER_RE = re.compile(r"#### (\d+)\s*$")
_WORDS = (
    "the a one some every small big old new red blue green cat dog bird fish tree house road "
    "river hill boat car man woman child friend teacher farmer sees finds likes takes makes "
    "walks runs sings reads writes near under over with from into and but then slowly quickly "
    "today often never always here there happy quiet bright dark"
).split()


def chain_of_thought(a: int, b: int) -> str:
    """The digit-by-digit chain of thought and final answer for ``a+b``."""
    lines = []
    a_rest, b_rest, carry, result = str(a), str(b), 0, ""
    while a_rest or b_rest or carry:
        da = int(a_rest[-1]) if a_rest else 0
        db = int(b_rest[-1]) if b_rest else 0
        a_rest, b_rest = a_rest[:-1], b_rest[:-1]
        total = da + db + carry
        lines.append(f"{da}+{db}+{carry}={total:02d} {a_rest}+{b_rest} ")
        carry, result = total // 10, str(total % 10) + result
        lines[-1] += result
    return "\n".join(lines) + f"\n#### {a + b}"


class Arithmetic:
    """Addition of two operands of 2 to 6 digits, graded exactly on the ``####`` answer."""

    name = "arithmetic"
    size = None

    def problems(self, n: int, seed: int) -> list[Problem]:
        """``n`` problems with operand lengths drawn uniformly, seeded."""
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            a, b = (
                rng.randrange(10 ** (k - 1), 10**k)
                for k in (rng.randint(MIN_DIGITS, MAX_DIGITS), rng.randint(MIN_DIGITS, MAX_DIGITS))
            )
            out.append(Problem(prompt=f"{a}+{b}=\n", solution=chain_of_thought(a, b), answer=str(a + b)))
        return out

    def extract_answer(self, completion: str) -> str | None:
        """The digits after the final ``####``, or None."""
        match = _ANSWER_RE.search(completion)
        return match.group(1) if match else None

    def is_correct(self, completion: str, answer: str) -> bool:
        """Exact match of the extracted answer."""
        return self.extract_answer(completion) == answer

    def generic_text(self, n_chars: int, seed: int) -> str:
        """English-like sentences made of a small word list, at least ``n_chars`` long."""
        rng = random.Random(seed)
        sentences: list[str] = []
        size = 0
        while size < n_chars:
            sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + "."
            sentences.append(sentence)
            size += len(sentence) + 1
        return " ".join(sentences)
