"""Embedded word problems for small pretrained chat models: one or two steps of addition, subtraction or
multiplication with numbers up to 20, in plain English ("Sam has 12 apples. Sam buys 7 more. ...").

No file and no hub: the problems are generated, seeded, so a CPU-only machine can evaluate a real
instruct model such as SmolLM2-135M on a task it can partly do. The reference solution is a short
worked answer; answers are integers, compared as numbers.
"""

import random

from stages.tasks.base import Item

NAMES = ("Sam", "Mia", "Leo", "Ava", "Noah", "Emma", "Liam", "Zoe", "Omar", "Lily", "Ravi", "Nora")
THINGS = ("apples", "books", "marbles", "stickers", "pencils", "coins", "cards", "shells", "eggs", "stamps")


def _problem(rng: random.Random) -> Item:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(5, 20)
    step = rng.choice(("buys", "gives", "groups", "buys_gives"))
    if step == "buys":
        b = rng.randint(1, 10)
        text = f"{name} has {a} {thing}. {name} buys {b} more. How many {thing} does {name} have now?"
        return Item(text, f"{a} + {b} = {a + b}. The answer is {a + b}.", str(a + b))
    if step == "gives":
        b = rng.randint(1, a - 1)
        text = f"{name} has {a} {thing} and gives {b} of them to a friend. How many {thing} does {name} have left?"
        return Item(text, f"{a} - {b} = {a - b}. The answer is {a - b}.", str(a - b))
    if step == "groups":
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        text = f"{name} has {a} boxes with {b} {thing} in each box. How many {thing} does {name} have in total?"
        return Item(text, f"{a} * {b} = {a * b}. The answer is {a * b}.", str(a * b))
    b, c = rng.randint(1, 10), rng.randint(1, a)
    text = f"{name} has {a} {thing}, buys {b} more, then gives {c} away. How many {thing} does {name} have now?"
    return Item(text, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. The answer is {a + b - c}.", str(a + b - c))


class WordArithmetic:
    """Endless seeded word problems with integer answers."""

    size = None

    def items(self, n: int, seed: int) -> list[Item]:
        """``n`` problems drawn with ``seed``."""
        rng = random.Random(seed)
        return [_problem(rng) for _ in range(n)]

    @staticmethod
    def grade(predicted: str, answer: str) -> bool:
        """Numeric equality (``12.0`` is 12), so the extractor's formatting does not matter."""
        try:
            return float(predicted) == float(answer)
        except ValueError:
            return False
