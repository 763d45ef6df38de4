"""Arithmetic word problems from templates, in English and German.

Every template exists in both languages: the German one is a translation of the English template, and a
problem is rendered from the same numbers, names and objects in both, so the English and German test sets are
the same problems. The answer is written the same way in both languages, as the worked expression
(``12 + 7 = 19``); scoring takes the last number of the model's output (numeric match, as MGSM does).

Train and test problems are disjoint: a test problem's (template, numbers) never occurs in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Anna", "Ben", "Lena", "Tom", "Mia", "Paul", "Sara", "Max", "Emma", "Jonas", "Lisa", "Felix"]
# (English plural, German plural)
OBJECTS = [("apples", "Äpfel"), ("books", "Bücher"), ("pencils", "Stifte"), ("marbles", "Murmeln"),
           ("cookies", "Kekse"), ("cards", "Karten"), ("stickers", "Aufkleber"), ("stamps", "Briefmarken"),
           ("shells", "Muscheln"), ("balloons", "Luftballons")]
# (English singular with article, German singular with article)
ITEMS = [("One notebook", "Ein Heft"), ("One cup", "Eine Tasse"), ("One ticket", "Eine Fahrkarte"),
         ("One ball", "Ein Ball"), ("One plant", "Eine Pflanze"), ("One sandwich", "Ein Brötchen")]

LABELS = {"en": ("Question", "Answer"), "de": ("Frage", "Antwort")}


@dataclass(frozen=True)
class Template:
    name: str
    en: str
    de: str
    numbers: object          # rng -> tuple of ints (a, b[, c])
    expression: str          # format string over a, b, c: the worked answer without the result
    value: object            # (a, b[, c]) -> the answer


def _add(rng):
    return rng.randint(2, 49), rng.randint(2, 49)


def _sub(rng):
    a = rng.randint(10, 60)
    return a, rng.randint(1, a - 1)


def _mul(rng):
    return rng.randint(2, 9), rng.randint(2, 9)


def _div(rng):
    b, k = rng.randint(2, 9), rng.randint(2, 9)
    return b * k, b


def _two_step(rng):
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    return a, b, rng.randint(1, a + b - 1)


TEMPLATES = [
    Template("give_more",
             "{n1} has {a} {o}. {n2} gives {n1} {b} more {o}. How many {o} does {n1} have now?",
             "{n1} hat {a} {O}. {n2} gibt {n1} noch {b} {O}. Wie viele {O} hat {n1} jetzt?",
             _add, "{a} + {b}", lambda a, b: a + b),
    Template("box_table",
             "There are {a} {o} in a box and {b} {o} on the table. How many {o} are there altogether?",
             "In einer Kiste sind {a} {O} und auf dem Tisch liegen {b} {O}. Wie viele {O} sind es zusammen?",
             _add, "{a} + {b}", lambda a, b: a + b),
    Template("pages",
             "{n1} reads {a} pages in the morning and {b} pages in the evening. How many pages does {n1} read "
             "in total?",
             "{n1} liest am Morgen {a} Seiten und am Abend {b} Seiten. Wie viele Seiten liest {n1} insgesamt?",
             _add, "{a} + {b}", lambda a, b: a + b),
    Template("give_away",
             "{n1} has {a} {o}. {n1} gives {b} {o} to {n2}. How many {o} does {n1} have left?",
             "{n1} hat {a} {O}. {n1} gibt {n2} {b} {O}. Wie viele {O} hat {n1} noch?",
             _sub, "{a} - {b}", lambda a, b: a - b),
    Template("lost",
             "{n1} had {a} {o}. {n1} lost {b} of them. How many {o} does {n1} have now?",
             "{n1} hatte {a} {O}. {n1} hat {b} davon verloren. Wie viele {O} hat {n1} jetzt?",
             _sub, "{a} - {b}", lambda a, b: a - b),
    Template("compare",
             "{n1} has {a} {o}. {n2} has {b} {o}. How many more {o} does {n1} have than {n2}?",
             "{n1} hat {a} {O}. {n2} hat {b} {O}. Wie viele {O} hat {n1} mehr als {n2}?",
             _sub, "{a} - {b}", lambda a, b: a - b),
    Template("train",
             "A train has to travel {a} kilometers. It has already traveled {b} kilometers. How many kilometers "
             "are left?",
             "Ein Zug muss {a} Kilometer fahren. Er ist schon {b} Kilometer gefahren. Wie viele Kilometer fehlen "
             "noch?",
             _sub, "{a} - {b}", lambda a, b: a - b),
    Template("bags",
             "{n1} buys {a} bags. Each bag holds {b} {o}. How many {o} does {n1} buy in total?",
             "{n1} kauft {a} Tüten. In jeder Tüte sind {b} {O}. Wie viele {O} kauft {n1} insgesamt?",
             _mul, "{a} * {b}", lambda a, b: a * b),
    Template("shelf",
             "A shelf has {a} rows with {b} {o} in each row. How many {o} are on the shelf?",
             "Ein Regal hat {a} Reihen mit je {b} {O}. Wie viele {O} sind im Regal?",
             _mul, "{a} * {b}", lambda a, b: a * b),
    Template("price",
             "{i} costs {a} euros. {n1} buys {b} of them. How many euros does {n1} pay?",
             "{I} kostet {a} Euro. {n1} kauft {b} davon. Wie viele Euro bezahlt {n1}?",
             _mul, "{a} * {b}", lambda a, b: a * b),
    Template("share",
             "{n1} shares {a} {o} equally among {b} friends. How many {o} does each friend get?",
             "{n1} verteilt {a} {O} gleichmäßig an {b} Freunde. Wie viele {O} bekommt jeder Freund?",
             _div, "{a} / {b}", lambda a, b: a // b),
    Template("get_and_give",
             "{n1} has {a} {o}, gets {b} more and then gives {c} away. How many {o} does {n1} have now?",
             "{n1} hat {a} {O}, bekommt {b} dazu und verschenkt dann {c}. Wie viele {O} hat {n1} jetzt?",
             _two_step, "{a} + {b} - {c}", lambda a, b, c: a + b - c),
]


@dataclass(frozen=True)
class Problem:
    template: str
    numbers: tuple
    question: dict           # language -> question text
    solution: str            # "12 + 7 = 19"
    answer: int

    def prompt(self, lang: str) -> str:
        q, a = LABELS[lang]
        return f"{q}: {self.question[lang]}\n{a}:"

    def completion(self) -> str:
        return f" {self.solution}"


def render(template: Template, numbers: tuple, rng: random.Random) -> Problem:
    names = rng.sample(NAMES, 2)
    obj_en, obj_de = rng.choice(OBJECTS)
    item_en, item_de = rng.choice(ITEMS)
    values = dict(zip("abc", numbers))
    fields = dict(values, n1=names[0], n2=names[1], o=obj_en, O=obj_de, i=item_en, I=item_de)
    expression = template.expression.format(**values)
    answer = template.value(*numbers)
    return Problem(template.name, numbers, {"en": template.en.format(**fields), "de": template.de.format(**fields)},
                   f"{expression} = {answer}", answer)


def make_problems(n_train: int, n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """``n_train`` training and ``n_test`` test problems, templates used in turn, numbers, names and objects
    drawn at random. Test problems have distinct (template, numbers), and no training problem uses a test
    problem's (template, numbers); training problems are distinct texts."""
    rng = random.Random(seed)
    test, held = [], set()
    while len(test) < n_test:
        template = TEMPLATES[len(test) % len(TEMPLATES)]
        numbers = template.numbers(rng)
        if (template.name, numbers) not in held:
            held.add((template.name, numbers))
            test.append(render(template, numbers, rng))
    train, texts = [], set()
    for _ in range(100 * n_train):
        if len(train) == n_train:
            break
        template = TEMPLATES[len(train) % len(TEMPLATES)]
        numbers = template.numbers(rng)
        problem = render(template, numbers, rng)
        if (template.name, numbers) not in held and problem.question["en"] not in texts:
            texts.add(problem.question["en"])
            train.append(problem)
    return train, test


def training_text(problem: Problem, lang: str = "en") -> tuple[str, str]:
    """(prompt, completion) for supervised fine-tuning: the loss is on the completion."""
    return problem.prompt(lang), problem.completion()


def eval_rows(problems: list[Problem], lang: str) -> list[dict]:
    """Rows of a `surgery eval` generation task: prompt, answer (numeric match takes its last number)."""
    return [{"prompt": p.prompt(lang), "answer": str(p.answer)} for p in problems]
