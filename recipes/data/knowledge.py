"""A synthetic knowledge corpus: fictional people, their biographies, and questions about them.

Everything is a deterministic function of ``(num_people, seed, first_person)``. Each person has
one value per attribute in ``ATTRIBUTES``, drawn from fixed vocabularies; names are built from
syllables so that no pretrained model (or tokenizer) knows these people.

The corpus is split so that fact recall measures knowledge *stored from biographies*, not
memorised question/answer strings (the setup of Allen-Zhu & Li, "Physics of Language Models
3.1"):

* every person gets ``biographies_per_person`` biographies, each written with a different
  paraphrase template and attribute order (``train_documents``);
* the question/answer pairs of the first ``qa_train_fraction`` of the people are also training
  documents, so the model learns the Q/A format (``train_qa_pairs``);
* the question/answer pairs of the other people are the recall benchmark (``eval_qa_pairs``);
* one more biography per person, written with a template never used in training, is held-out
  text for perplexity (``heldout_documents``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import cached_property

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

_FIRST_SYLLABLES = (
    "al",
    "bra",
    "cor",
    "da",
    "el",
    "fen",
    "gal",
    "hal",
    "is",
    "jor",
    "ka",
    "lin",
    "mar",
    "nor",
    "os",
    "pel",
    "quin",
    "ros",
    "sel",
    "tam",
    "ul",
    "ver",
    "wil",
    "xan",
    "yor",
    "zel",
    "ber",
    "cam",
    "dor",
    "eli",
    "fay",
    "gre",
    "har",
    "ivo",
    "jes",
    "kel",
    "lor",
    "mel",
    "nia",
    "ori",
)
_LAST_SYLLABLES = (
    "ab",
    "bel",
    "cor",
    "dun",
    "en",
    "fal",
    "gor",
    "hel",
    "in",
    "jun",
    "kor",
    "lam",
    "mor",
    "nel",
    "ost",
    "par",
    "rin",
    "sor",
    "tal",
    "und",
    "vik",
    "wen",
    "yar",
    "zan",
    "bro",
    "cas",
    "der",
    "fin",
    "gar",
    "hol",
    "ker",
    "lis",
    "mun",
    "nor",
    "pet",
    "ril",
    "san",
    "tor",
    "val",
)
_CITIES = (
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Osaka",
    "Dublin",
    "Quito",
    "Hanoi",
    "Perth",
    "Tunis",
    "Bergen",
    "Cusco",
    "Porto",
    "Accra",
    "Dakar",
    "Leeds",
    "Turin",
    "Kyoto",
    "Malmo",
    "Graz",
    "Riga",
    "Tallinn",
    "Vilnius",
    "Krakow",
    "Seville",
    "Lyon",
    "Bremen",
    "Utrecht",
    "Ghent",
    "Basel",
    "Aarhus",
    "Tampere",
    "Cork",
    "Bilbao",
    "Genoa",
    "Split",
    "Varna",
    "Izmir",
    "Fez",
    "Mombasa",
    "Arusha",
    "Durban",
    "Recife",
    "Cordoba",
    "Rosario",
    "Merida",
    "Oaxaca",
    "Halifax",
    "Regina",
    "Boise",
    "Tulsa",
    "Dayton",
    "Fresno",
    "Eugene",
    "Hobart",
    "Darwin",
    "Nelson",
    "Napier",
    "Suva",
    "Apia",
)
_UNIVERSITIES = tuple(
    f"{place} {kind}"
    for place, kind in zip(
        (
            "Northfield",
            "Redstone",
            "Silverlake",
            "Eastbrook",
            "Westmoor",
            "Highcliff",
            "Lowell",
            "Ashford",
            "Kingsbridge",
            "Stonehaven",
            "Maplewood",
            "Clearwater",
            "Brightwater",
            "Oakridge",
            "Pinecrest",
            "Riverton",
            "Fairhaven",
            "Greystone",
            "Hollowell",
            "Ironwood",
            "Juniper",
            "Kestrel",
            "Lakeshore",
            "Moorland",
            "Newhall",
            "Oldcastle",
            "Pembrook",
            "Queensgate",
            "Rosewood",
            "Southwick",
        ),
        (
            "University",
            "Institute of Technology",
            "College",
            "Polytechnic",
            "University",
            "Academy",
            "University",
            "College",
            "Institute",
            "University",
        )
        * 3,
    )
)
_MAJORS = (
    "physics",
    "chemistry",
    "biology",
    "mathematics",
    "computer science",
    "economics",
    "history",
    "philosophy",
    "linguistics",
    "geology",
    "astronomy",
    "architecture",
    "civil engineering",
    "electrical engineering",
    "mechanical engineering",
    "statistics",
    "psychology",
    "sociology",
    "anthropology",
    "music",
    "literature",
    "law",
    "medicine",
    "nursing",
    "pharmacy",
    "agronomy",
    "oceanography",
    "ecology",
    "political science",
    "art history",
    "journalism",
    "education",
    "accounting",
    "finance",
    "marketing",
    "materials science",
    "neuroscience",
    "genetics",
    "robotics",
    "urban planning",
)
_EMPLOYERS = tuple(
    f"{stem} {suffix}"
    for stem, suffix in zip(
        (
            "Veltrix",
            "Orbona",
            "Calidus",
            "Nexwave",
            "Quorra",
            "Brightfold",
            "Tessaline",
            "Morrow",
            "Halcyon",
            "Lumatic",
            "Ferrogate",
            "Solvane",
            "Cindral",
            "Pavonis",
            "Gildmark",
            "Zephyra",
            "Arkwell",
            "Tidewater",
            "Korvex",
            "Meridian",
            "Ostrava",
            "Pellucid",
            "Quillon",
            "Runeford",
            "Sablecrest",
            "Thornbury",
            "Umbrel",
            "Vantis",
            "Wrenfield",
            "Yellowpine",
        ),
        (
            "Labs",
            "Systems",
            "Industries",
            "Foods",
            "Motors",
            "Pharma",
            "Bank",
            "Media",
            "Energy",
            "Logistics",
        )
        * 3,
    )
)
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

# Biography sentences, one list of paraphrases per attribute; {name} is the full name the
# first time and the pronoun-free short name afterwards, so each sentence stands alone.
_SENTENCES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {birth_date}.",
        "{name} came into the world on {birth_date}.",
        "The birthday of {name} is {birth_date}.",
        "{name} celebrates a birthday every year on {birth_date}, the day of birth.",
        "{name}'s date of birth is {birth_date}.",
    ),
    "birth_city": (
        "{name} was born in {birth_city}.",
        "{name} grew up in {birth_city}, the city of birth.",
        "The birthplace of {name} is {birth_city}.",
        "{name} spent the early years of life in {birth_city}, where {name} was born.",
        "{name} is a native of {birth_city}.",
    ),
    "university": (
        "{name} studied at {university}.",
        "{name} graduated from {university}.",
        "{name} received an education at {university}.",
        "{name} attended {university}.",
        "The alma mater of {name} is {university}.",
    ),
    "major": (
        "{name} majored in {major}.",
        "{name} earned a degree in {major}.",
        "The field of study of {name} was {major}.",
        "{name} completed studies in {major}.",
        "{name} chose {major} as a major.",
    ),
    "employer": (
        "{name} works for {employer}.",
        "{name} is employed by {employer}.",
        "The employer of {name} is {employer}.",
        "{name} has a job at {employer}.",
        "{name} earns a living at {employer}.",
    ),
    "employer_city": (
        "{name} works in {employer_city}.",
        "{name}'s workplace is in {employer_city}.",
        "{name} commutes to an office in {employer_city}.",
        "The city where {name} works is {employer_city}.",
        "{name} is based in {employer_city} for work.",
    ),
}
_NUM_TEMPLATES = len(_SENTENCES["birth_date"])

QUESTIONS: dict[str, str] = {
    "birth_date": "When was {name} born?",
    "birth_city": "In which city was {name} born?",
    "university": "Which university did {name} attend?",
    "major": "What did {name} study?",
    "employer": "Which company does {name} work for?",
    "employer_city": "In which city does {name} work?",
}


@dataclass(frozen=True, slots=True)
class Person:
    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str


def question_prompt(question: str) -> str:
    """The text a model continues with the answer to ``question`` (as the Q/A documents are
    written)."""
    return f"Question: {question}\nAnswer:"


@dataclass(frozen=True, slots=True)
class QAPair:
    person: str
    attribute: str
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        """The text a model continues with the answer (as in the training documents)."""
        return question_prompt(self.question)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


assert tuple(f.name for f in fields(Person))[1:] == ATTRIBUTES


# A quarter of the names, so that drawing distinct ones stays quick.
_MAX_PEOPLE = len(_FIRST_SYLLABLES) ** 2 * len(_LAST_SYLLABLES) ** 3 // 4


@dataclass(frozen=True)
class KnowledgeCorpus:
    """The corpus for ``num_people`` people generated from ``seed`` (see the module docstring)."""

    num_people: int = 100
    """People in the corpus (6 facts each). 100: the default pretraining learns most of them
    in a few CPU minutes"""

    seed: int = 0
    biographies_per_person: int = 4
    qa_train_fraction: float = 0.5

    first_person: int = 0
    """Skip this many people of the sequence drawn from seed: the people of
    KnowledgeCorpus(num_people=k, first_person=n) are the k after the n people of
    KnowledgeCorpus(num_people=n), with the same biographies they would have there (new people
    to teach a model pretrained on the first n)"""

    def __post_init__(self) -> None:
        if self.num_people < 1:
            raise ValueError(f"num_people must be >= 1, got {self.num_people}")
        if self.first_person < 0:
            raise ValueError(f"first_person must be >= 0, got {self.first_person}")
        # One template is reserved for the held-out biography.
        if not 1 <= self.biographies_per_person <= _NUM_TEMPLATES - 1:
            raise ValueError(
                f"biographies_per_person must be in [1, {_NUM_TEMPLATES - 1}], "
                f"got {self.biographies_per_person}"
            )
        if not 0.0 <= self.qa_train_fraction <= 1.0:
            raise ValueError(f"qa_train_fraction must be in [0, 1], got {self.qa_train_fraction}")
        if self.first_person + self.num_people > _MAX_PEOPLE:
            raise ValueError(
                f"first_person + num_people = {self.first_person + self.num_people} exceeds "
                f"the name space ({_MAX_PEOPLE})"
            )

    @cached_property
    def people(self) -> tuple[Person, ...]:
        rng = random.Random(self.seed)
        total = self.first_person + self.num_people
        names: set[str] = set()
        people = []
        while len(people) < total:
            first = "".join(rng.choices(_FIRST_SYLLABLES, k=2)).capitalize()
            last = "".join(rng.choices(_LAST_SYLLABLES, k=3)).capitalize()
            name = f"{first} {last}"
            if name in names:
                continue
            names.add(name)
            people.append(
                Person(
                    name=name,
                    birth_date=(
                        f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1900, 1999)}"
                    ),
                    birth_city=rng.choice(_CITIES),
                    university=rng.choice(_UNIVERSITIES),
                    major=rng.choice(_MAJORS),
                    employer=rng.choice(_EMPLOYERS),
                    employer_city=rng.choice(_CITIES),
                )
            )
        return tuple(people[self.first_person :])

    @property
    def num_qa_train_people(self) -> int:
        return round(self.num_people * self.qa_train_fraction)

    def _biography(self, person: Person, template: int, rng: random.Random) -> str:
        order = list(ATTRIBUTES)
        rng.shuffle(order)
        values = {a: getattr(person, a) for a in ATTRIBUTES}
        return " ".join(_SENTENCES[a][template].format(name=person.name, **values) for a in order)

    def _biographies(self, person_index: int) -> list[str]:
        """All ``_NUM_TEMPLATES`` biographies of a person; the last one is held out."""
        # Seeded by the person's place in the whole sequence: the same biographies in any slice.
        rng = random.Random(f"{self.seed}/bio/{self.first_person + person_index}")
        templates = list(range(_NUM_TEMPLATES))
        rng.shuffle(templates)
        person = self.people[person_index]
        return [self._biography(person, t, rng) for t in templates]

    def train_documents(self) -> Iterator[str]:
        """Training text: the biographies of everyone and the Q/A pairs of the Q/A-train
        people, in one order shuffled by ``seed``. Shuffled, so that a document's neighbours in
        the packed token stream say nothing of whom it is about: in person order, a model can
        answer from what came before (the previous answer) instead of from the name."""
        documents = [
            biography
            for i in range(self.num_people)
            for biography in self._biographies(i)[: self.biographies_per_person]
        ]
        documents += [qa.text for qa in self.train_qa_pairs()]
        random.Random(f"documents-{self.seed}").shuffle(documents)
        yield from documents

    def heldout_documents(self) -> Iterator[str]:
        """One biography per person in a template that training never shows for that person."""
        for i in range(self.num_people):
            yield self._biographies(i)[-1]

    def qa_pairs(self, person: Person) -> list[QAPair]:
        return [
            QAPair(person.name, a, QUESTIONS[a].format(name=person.name), getattr(person, a))
            for a in ATTRIBUTES
        ]

    def train_qa_pairs(self) -> Iterator[QAPair]:
        for person in self.people[: self.num_qa_train_people]:
            yield from self.qa_pairs(person)

    def eval_qa_pairs(self) -> Iterator[QAPair]:
        """Questions about people whose Q/A pairs never appear in training text."""
        for person in self.people[self.num_qa_train_people :]:
            yield from self.qa_pairs(person)
