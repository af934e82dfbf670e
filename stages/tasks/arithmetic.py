"""The embedded reasoning task: multi-digit addition with a digit-by-digit chain of thought.

A prompt is ``a+b=``. The chain of thought has one line per digit, from the right:
``{da}+{db}+{carry}={sum:02d} {a_rest}+{b_rest} {result_so_far}``, and ends with
``#### {a+b}``. Each line copies the shrinking operands of the line before, so the model
finds the next digits beside a delimiter instead of counting positions. The chain is
several times longer than the prompt and grows with the operands, so a damaged model's
longer, rambling outputs are measurable.
"""

import random

from stages.tasks.base import Item

ALPHABET = "0123456789+=# \n.abcdefghijklmnopqrstuvwxyz"
MIN_DIGITS, MAX_DIGITS = 2, 6


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
    """Addition of two operands of 2 to 6 digits, graded by exact match of the answer string."""

    size = None

    def items(self, n: int, seed: int) -> list[Item]:
        """``n`` problems with operand lengths drawn uniformly, seeded."""
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            a, b = (
                rng.randrange(10 ** (k - 1), 10**k)
                for k in (rng.randint(MIN_DIGITS, MAX_DIGITS), rng.randint(MIN_DIGITS, MAX_DIGITS))
            )
            out.append(Item(text=f"{a}+{b}=\n", solution=chain_of_thought(a, b), answer=str(a + b)))
        return out

    @staticmethod
    def grade(predicted: str, answer: str) -> bool:
        """Exact match: the embedded model writes the digits it was taught, so ``046`` is wrong for 46."""
        return predicted == answer
