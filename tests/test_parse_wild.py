"""Answers real models wrote to prompts that were not grounding's (issue 15): every
object a careful reader finds in each, nothing else, in each file's own family dialect;
then each reading rule on small constructed answers, in every dialect."""

from __future__ import annotations

import pytest

from grounding import parse
from grounding.parsing import Keys
from tests.real_outputs import raw_text

FAMILY_DIALECT = {"qwenvl": "qwen-vl", "qwen2vl": "qwen2-vl", "qwen25vl": "qwen2.5-vl",
                  "qwen3vl": "qwen3-vl", "deepseekvl2": "deepseek-vl2"}
DIALECTS = ("qwen2.5-vl", "qwen3-vl", "qwen2-vl", "qwen-vl", "deepseek-vl2")
JSON_DIALECTS = ("qwen2.5-vl", "qwen3-vl", "qwen2-vl")


def B(label, *c):
    return ("box", label, tuple(float(v) for v in c))


def P(label, *c):
    return ("point", label, tuple(float(v) for v in c))


# file -> (objects in order, truncated); from /work/staging15 inventory of what a person reads
WILD = {
    "qwenvl_base_caption_echoed_img_prompt.txt":
        ([B("Woman", 451, 379, 731, 806), B("her dog", 219, 424, 576, 896)], False),
    "qwenvl_chat_quoted_ref_label.txt": ([B("击掌", 211, 412, 577, 891)], False),
    "qwenvl_tutorial_two_refs_shanghai.txt":
        ([B("上海环球金融中心", 667, 437, 760, 874), B("东方明珠", 506, 75, 582, 946)], False),
    "qwenvl_grounded_caption_one_ref_two_boxes.txt":
        ([B("Two apples", 302, 257, 582, 671), B("Two apples", 603, 252, 878, 642),
          B("a bowl", 2, 269, 304, 674)], False),
    "qwenvl_swift_deploy_one_ref_three_boxes_zh.txt":
        ([B("花", 34, 449, 368, 981), B("花", 342, 456, 670, 917), B("花", 585, 508, 859, 977)],
         False),
    "qwenvl_swift_deploy_flowers_en.txt": ([B("flowers", 33, 448, 360, 979)], False),
    "qwen2vl_mlx_json_object_bboxes_desk.txt":
        ([B("computer monitor", 290, 250, 640, 600), B("speaker", 270, 520, 340, 730),
          B("speaker", 650, 350, 720, 560), B("desk", 170, 450, 820, 999),
          B("keyboard", 410, 600, 590, 620), B("mouse", 600, 590, 660, 620),
          B("chair", 250, 900, 750, 1000), B("drum set", 830, 400, 1000, 999)], False),
    "qwen2vl_mlx_json_dog_human_inline_bboxes.txt":
        ([B("dog", 378, 180, 678, 741), B("human", 365, 100, 902, 999)], False),
    "qwen2vl_mlx_json_two_cats.txt":
        ([B("cat", 10, 10, 500, 980), B("cat", 500, 10, 910, 780)], False),
    "qwen2vl_highfive_special_tokens_im_end.txt": ([B("击掌", 531, 516, 581, 596)], False),
    "qwen2vl_stripped_tokens_bare_box.txt": ([B(None, 542, 553, 629, 663)], False),
    "qwen2vl_stripped_tokens_repeated_box_cutoff.txt":
        ([B(None, 877, 629, 904, 653)] * 5, True),
    "qwen2vl_visual_rft_think_answer_single_quotes.txt":
        ([B("person", 608, 446, 636, 476)], False),
    "qwen2vl_os_atlas_language_switch.txt": ([B("language switch", 576, 12, 592, 42)], False),
    "qwen25vl_roboflow_chairs_abs_gt1000.txt":
        ([B("chair", 74, 631, 465, 1138), B("chair", 409, 512, 545, 700),
          B("chair", 515, 550, 728, 733), B("chair", 625, 515, 728, 728)], False),
    "qwen25vl_vlm_r1_think_answer_json.txt":
        ([B("man wearing blue shirt and shorts", 368, 1, 475, 330)], False),
    "qwen25vl_mlx_person_dog_two_space_indent.txt":
        ([B("person holding a dog", 171, 105, 428, 699), B("dog", 180, 158, 318, 504)], False),
    "qwen25vl_mlx_two_cats_input_width_644.txt":
        ([B("cat", 10, 137, 313, 518), B("cat", 353, 110, 644, 512)], False),
    "qwen25vl_swift_finetune_unclosed_box.txt": ([], True),
    "qwen25vl_swift_finetune_three_points.txt": ([], False),
    "qwen3vl_repeated_keys_cut_off.txt":
        ([B("monitor", 195, 138, 617, 480), B("laptop", 663, 399, 917, 657),
          B("keyboard", 254, 584, 569, 657)], True),
    "qwen3vl_bare_json_tag_watch.txt":
        ([B("watch", 323, 118, 444, 825), B("watch", 444, 118, 565, 825),
          B("watch", 565, 118, 686, 825), B("watch", 686, 118, 807, 825)], False),
    "qwen3vl_mobile_agent_tool_call_arguments.txt": ([P(None, 447, 81)], False),
    "qwen3vl_finetuned_vllm_stripped_tokens.txt": ([B("图片", 460, 66, 683, 252)], False),
    "qwen3vl_swift_finetune_nested_special_token_box.txt":
        ([B("<ref-object>", 233, 489, 378, 606)], False),
    "qwen3vl_swift_finetune_no_box_placeholder.txt": ([], False),
    "deepseekvl2_role_prefix_unclosed_det_9999_loop.txt": ([], True),
    "deepseekvl2_refcoco_out_of_range_99999.txt": ([], False),
    "deepseekvl2_refcoco_unfinished_box.txt": ([], False),
    "deepseekvl2_refcoco_five_numbers.txt": ([], False),
    "deepseekvl2_paddlemix_panda_prompt_echo.txt": ([B("The Panda", 100, 192, 998, 998)], False),
    "deepseekvl2_replicate_watermelon.txt": ([B("watermelon slices", 159, 327, 408, 615)], False),
    "deepseekvl2_replicate_giraffe.txt":
        ([B("The giraffe at the back.", 104, 289, 357, 613)], False),
}

# Complete but unusable: counted invalid, never read.
INVALID = {"qwen25vl_swift_finetune_three_points.txt": 1,
           "deepseekvl2_refcoco_out_of_range_99999.txt": 1,
           "deepseekvl2_refcoco_unfinished_box.txt": 1,
           "deepseekvl2_refcoco_five_numbers.txt": 1,
           "qwen3vl_swift_finetune_no_box_placeholder.txt": 1,
           # Its first box [0, 50, 55, 9999] is closed (read from the cut det list) but
           # 9999 is far outside 0-999; the runaway second box is the cut (truncated).
           "deepseekvl2_role_prefix_unclosed_det_9999_loop.txt": 1}


def got(parsed):
    return [(o.kind, o.label, o.coords) for o in parsed.objects]


@pytest.mark.parametrize("name", sorted(WILD))
def test_wild_answer_reads_as_a_person_reads_it(name):
    expected, truncated = WILD[name]
    parsed = parse(raw_text(name), FAMILY_DIALECT[name.split("_", 1)[0]])
    assert got(parsed) == expected
    assert parsed.truncated == truncated
    assert parsed.invalid == INVALID.get(name, 0)


def test_wild_attributes():
    tool = parse(raw_text("qwen3vl_mobile_agent_tool_call_arguments.txt"), "qwen3-vl")
    assert tool.objects[0].attributes == {"action": "click"}
    nested = parse(raw_text("qwen3vl_swift_finetune_nested_special_token_box.txt"), "qwen3-vl")
    assert nested.objects[0].attributes == {"language": "evaluate"}


# --- rules on constructed answers --------------------------------------------------------


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_repeated_keys_are_read_pair_by_pair(dialect):
    text = '{"name": "cup", "box": [1, 2, 3, 4], "name": "plate", "box": [5, 6, 7, 8]}'
    assert got(parse(text, dialect)) == [B("cup", 1, 2, 3, 4), B("plate", 5, 6, 7, 8)]
    single = "{'name': 'cup', 'box': [1, 2, 3, 4], 'name': 'plate', 'box': [5, 6, 7, 8],}"
    assert got(parse(single, dialect)) == [B("cup", 1, 2, 3, 4), B("plate", 5, 6, 7, 8)]


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_repeated_keys_cut_off_drop_the_last_pair(dialect):
    text = '{"name": "cup", "box": [1, 2, 3, 4], "name": "plate", "box": [5, 6, 7, 8'
    parsed = parse(text, dialect)
    assert got(parsed) == [B("cup", 1, 2, 3, 4)] and parsed.truncated
    # Cut after a complete pair: the group may still lack fields, so it is dropped too.
    parsed = parse('{"name": "cup", "box": [1, 2, 3, 4], "name": "plate", "box": [5, 6, 7, 8],',
                   dialect)
    assert got(parsed) == [B("cup", 1, 2, 3, 4)] and parsed.truncated
    # Without repeated keys an unclosed object gives nothing, as before.
    assert got(parse('{"box": [1, 2, 3, 4], "label": "cu', dialect)) == []


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_prompt_keys_and_nested_tool_arguments(dialect):
    text = ('[{"object": "a", "position": [1, 2, 3, 4]}, {"result": [5, 6]}, '
            '{"tool": "t", "arguments": {"action": "click", "coordinates": [7, 8]}}]')
    parsed = parse(text, dialect)
    assert got(parsed) == [B("a", 1, 2, 3, 4), P(None, 5, 6), P(None, 7, 8)]
    assert parsed.objects[2].attributes == {"action": "click"}


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_one_label_several_boxes(dialect):
    text = '[{"object": "cat", "bboxes": [[1, 2, 3, 4], [5, 6, 7, 8]]}, {"bbox_2d": [[1, 1, 2, 2], [3, 3, 4, 4]], "label": "dog"}]'
    assert got(parse(text, dialect)) == [B("cat", 1, 2, 3, 4), B("cat", 5, 6, 7, 8),
                                         B("dog", 1, 1, 2, 2), B("dog", 3, 3, 4, 4)]


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_confidence_is_an_attribute_and_labels(dialect):
    text = ("<think></think><answer>[{'Position': [1, 2, 3, 4], 'Confidence': 0.9, "
            "'thought': 'the cup', 'object_name': 'cup'}]</answer>")
    parsed = parse(text, dialect)
    assert got(parsed) == [B("cup", 1, 2, 3, 4)]
    assert parsed.objects[0].attributes == {"Confidence": 0.9, "thought": "the cup"}
    # Several label keys: the first of LABEL_KEYS wins, the others stay attributes.
    two = parse('{"name": "cup", "label": "mug", "box": [1, 2, 3, 4]}', dialect).objects[0]
    assert two.label == "mug" and two.attributes == {"name": "cup"}


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_ambiguous_numbers_are_attributes(dialect):
    text = ('{"label": "car", "position": [10, 20, 30, 40], "color": [255, 0, 0, 255], '
            '"size": [20, 20], "tint": [255, 128, 0, 0.5]}')
    parsed = parse(text, dialect)
    assert got(parsed) == [B("car", 10, 20, 30, 40)]
    assert set(parsed.objects[0].attributes) == {"color", "size", "tint"}
    # Only non-coordinate numbers: not an object at all.
    assert got(parse('{"label": "car", "rgb": [1, 2, 3, 4]}', dialect)) == []


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_user_keys_override_the_rule(dialect):
    text = '{"label": "car", "name": "red car", "area": [1, 2, 3, 4], "hit": [5, 6, 7, 8]}'
    assert got(parse(text, dialect)) == [B("car", 1, 2, 3, 4), B("car", 5, 6, 7, 8)]
    only = parse(text, dialect, Keys(box="hit", label="name"))
    assert got(only) == [B("red car", 5, 6, 7, 8)]
    assert only.objects[0].attributes == {"label": "car", "area": [1, 2, 3, 4]}
    assert got(parse(text, dialect, Keys(label="name"))) == [B("red car", 1, 2, 3, 4),
                                                             B("red car", 5, 6, 7, 8)]
    assert got(parse('{"spot": [5, 6], "label": "x"}', dialect, Keys(point="spot"))) == [
        P("x", 5, 6)]
    assert got(parse(text, dialect, Keys(box="missing"))) == []


@pytest.mark.parametrize(("dialect", "broken", "good"), [
    ("deepseek-vl2", "<|ref|>dog<|/ref|><|det|>[[41, ",
     "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>"),
    ("qwen-vl", "<ref>dog</ref><box>(41,", "<ref>cat</ref><box>(1,2),(3,4)</box>"),
    ("qwen2-vl", "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(41,",
     "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"),
    ("qwen2.5-vl", "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(41,",
     "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"),
])
def test_broken_run_never_swallows_the_next(dialect, broken, good):
    parsed = parse(broken + good, dialect)
    assert got(parsed) == [B("cat", 1, 2, 3, 4)]
    assert parsed.invalid == 1 and not parsed.truncated
    cut = parse(good + broken, dialect)  # the broken run at the end: cut off
    assert got(cut) == [B("cat", 1, 2, 3, 4)]
    assert cut.truncated and cut.invalid == 0


@pytest.mark.parametrize("dialect", ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"))
def test_token_box_inside_json_is_read_once(dialect):
    in_string = '[{"bbox_2d": "<|box_start|>(1,2),(3,4)<|box_end|>", "label": "a"}]'
    assert got(parse(in_string, dialect)) == [B("a", 1, 2, 3, 4)]
    as_value = '[{"bbox_2d": <|box_start|>(1,2),(3,4)<|box_end|>, "label": "a"}]'
    assert got(parse(as_value, dialect)) == [B("a", 1, 2, 3, 4)]


def test_role_prefix_prompt_echo_and_end_tokens_are_not_objects():
    text = ("<|User|>: <image>\n<|ref|>cat<|/ref|>.\n<|Assistant|>: <|ref|>cat<|/ref|>"
            "<|det|>[[1, 2, 3, 4]]<|/det|><｜end▁of▁sentence｜>")
    assert got(parse(text, "deepseek-vl2")) == [B("cat", 1, 2, 3, 4)]
    text = ("<img>http://x/a.jpg</img>Generate the caption:<ref> a cat</ref><box>(1,2),(3,4)"
            "</box> sleeping<|endoftext|>")
    assert got(parse(text, "qwen-vl")) == [B("a cat", 1, 2, 3, 4)]
    text = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|><|im_end|>"
    assert got(parse(text, "qwen2-vl")) == [B("cat", 1, 2, 3, 4)]
    for dialect in DIALECTS:
        assert got(parse("<|Assistant|>: I see a cat <|im_end|>", dialect)) == []


@pytest.mark.parametrize(("dialect", "text"), [
    ("qwen2-vl", "<|box_start|>(1,2),(3,9999)<|box_end|>"),
    ("qwen-vl", "<box>(1,2),(3,9999)</box>"),
    ("deepseek-vl2", "<|det|>[[1, 2, 3, 9999]]<|/det|>"),
    ("qwen3-vl", '{"bbox_2d": [1, 2, 3, 9999], "label": "a"}'),
    ("qwen2-vl", '{"bbox_2d": [1, 2, 3, 9999], "label": "a"}'),
])
def test_far_outside_a_relative_frame_is_invalid(dialect, text):
    parsed = parse(text, dialect)
    assert got(parsed) == [] and parsed.invalid == 1


def test_absolute_frame_is_not_bounded_at_parse_time():
    assert got(parse('{"bbox_2d": [1, 2, 3, 9999], "label": "a"}', "qwen2.5-vl")) == [
        B("a", 1, 2, 3, 9999)]


@pytest.mark.parametrize("dialect", ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"))
def test_bare_boxes_only_without_tokens_and_never_completed(dialect):
    assert got(parse("the cat(1,2),(3,4)", dialect)) == [B("the cat", 1, 2, 3, 4)]
    cut = parse("(1,2),(3,4)(1,2),(3,", dialect)
    assert got(cut) == [B(None, 1, 2, 3, 4)] and cut.truncated
    assert got(parse("<|box_start|>(1,2),(3,4)", dialect)) == []


def test_json_in_qwen2_vl_think_answer_single_quotes():
    text = "<think>\n</think>\n<answer> [{'bbox_2d': [1, 2, 3, 4], 'label': 'person'}]</answer>"
    assert got(parse(text, "qwen2-vl")) == [B("person", 1, 2, 3, 4)]


def test_qwen_vl_labels_lose_spaces_and_wrapping_quotes():
    assert got(parse('<ref> "a cat" </ref><box>(1,2),(3,4)</box>', "qwen-vl")) == [
        B("a cat", 1, 2, 3, 4)]
    assert got(parse('<ref>the "big" cat</ref><box>(1,2),(3,4)</box>', "qwen-vl")) == [
        B('the "big" cat', 1, 2, 3, 4)]


def test_named_keys_reach_the_parser_from_every_command(tmp_path):
    """--box-key / --label-key on parse, and through label into run.json and records."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from grounding.cli import app
    from grounding.testing.loopback import LoopbackServer, fixed_handler

    answer = ('[{"what": "cup", "where": [10, 20, 110, 120], "area": [1, 2, 3, 4]},'
              ' {"what": "plate", "where": [200, 200, 300, 260], "area": [5, 6, 7, 8]}]')
    path = tmp_path / "answer.txt"
    path.write_text(answer, encoding="utf-8")
    runner = CliRunner()
    guessed = json.loads(runner.invoke(app, ["parse", str(path), "-d", "qwen3-vl"]).stdout)
    named = json.loads(runner.invoke(app, ["parse", str(path), "-d", "qwen3-vl", "--box-key",
                                           "where", "--label-key", "what"]).stdout)
    assert [d["model_bbox"] for d in named["detections"]] == [[10, 20, 110, 120],
                                                             [200, 200, 300, 260]]
    assert [d["label"] for d in named["detections"]] == ["cup", "plate"]
    # Guessed: the only text field is the label; both 4-number lists are boxes.
    assert [(d["label"], d["model_bbox"]) for d in guessed["detections"]] == [
        ("cup", [10, 20, 110, 120]), ("cup", [1, 2, 3, 4]),
        ("plate", [200, 200, 300, 260]), ("plate", [5, 6, 7, 8])]
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (400, 300), "gray").save(images / "a.png")
    with LoopbackServer(handler=fixed_handler(answer)) as server:
        out = runner.invoke(app, ["label", str(images), "--out", str(tmp_path / "run"),
                                  "--classes", "cup,plate", "--backend", "openai",
                                  "--base-url", server.base_url, "--model", "m",
                                  "--dialect", "qwen3-vl", "--prompt", "Where are {class}?",
                                  "--box-key", "where", "--label-key", "what"])
    assert out.exit_code == 0, out.output
    config = json.loads((tmp_path / "run" / "run.json").read_text())
    assert config["keys"] == {"box": "where", "label": "what"}
    assert config["prompt"] == "Where are cup, plate?"
    record = json.loads((tmp_path / "run" / "predictions.jsonl").read_text())
    assert [(d["label"], d["class_id"]) for d in record["detections"]] == [("cup", 0),
                                                                         ("plate", 1)]


# --- only the answer is read: not the reasoning, not an echoed prompt (issue 15 review) ---

DRAFT = '[{"bbox_2d": [0, 0, 50, 50], "label": "cat"}]'
FINAL = '[{"bbox_2d": [10, 20, 110, 120], "label": "cat"}]'


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_boxes_inside_a_think_block_are_not_detections(dialect):
    text = f"<think>Draft: {DRAFT} - no...</think>```json{FINAL}```"
    parsed = parse(text, dialect)
    assert got(parsed) == [B("cat", 10, 20, 110, 120)] and not parsed.truncated
    # The opener was in the prompt (chat templates that start the reasoning themselves).
    assert got(parse(f"Draft: {DRAFT}\n</think>\n{FINAL}", dialect)) == [
        B("cat", 10, 20, 110, 120)]


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_an_unclosed_think_block_is_an_answer_that_never_came(dialect):
    parsed = parse(f"<think>Maybe {DRAFT} or", dialect)
    assert got(parsed) == [] and parsed.truncated and parsed.invalid == 0
    tokens = parse("<think><|object_ref_start|>cat<|object_ref_end|>"
                   "<|box_start|>(1,2),(3,4)<|box_end|>", dialect)
    assert got(tokens) == [] and tokens.truncated


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_an_echoed_chat_prompt_is_not_the_answer(dialect):
    templated = (f"<|im_start|>user\nAnswer like {DRAFT}<|im_end|>\n"
                 f"<|im_start|>assistant\n{FINAL}<|im_end|>")
    assert got(parse(templated, dialect)) == [B("cat", 10, 20, 110, 120)]
    stripped = (f"system\nYou are a helpful assistant.\nuser\nAnswer like {DRAFT}\n"
                f"assistant\n{FINAL}")
    assert got(parse(stripped, dialect)) == [B("cat", 10, 20, 110, 120)]
    # "assistant" alone on a line with no user turn before it is just a word of the answer.
    assert got(parse(f"assistant\n{FINAL}", dialect)) == [B("cat", 10, 20, 110, 120)]


def test_an_echoed_deepseek_user_turn_is_not_the_answer():
    text = ("<|User|>: <|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n"
            "<|Assistant|>: <|ref|>cat<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>")
    assert got(parse(text, "deepseek-vl2")) == [B("cat", 5, 6, 7, 8)]
    qwen_vl = ("<|im_start|>user\n<ref>cat</ref><box>(1,2),(3,4)</box><|im_end|>\n"
               "<|im_start|>assistant\n<ref>cat</ref><box>(5,6),(7,8)</box>")
    assert got(parse(qwen_vl, "qwen-vl")) == [B("cat", 5, 6, 7, 8)]


def test_a_cut_deepseek_det_list_keeps_its_closed_boxes():
    cut = parse("<|ref|>cat<|/ref|><|det|>[[100,200,300,400], [500,2", "deepseek-vl2")
    assert got(cut) == [B("cat", 100, 200, 300, 400)] and cut.truncated and cut.invalid == 0
    broken = parse("<|ref|>cat<|/ref|><|det|>[[100,200,300,400], [12"
                   "<|ref|>dog<|/ref|><|det|>[[1,2,3,4]]<|/det|>", "deepseek-vl2")
    assert got(broken) == [B("cat", 100, 200, 300, 400), B("dog", 1, 2, 3, 4)]
    assert broken.invalid == 1 and not broken.truncated
    # A det left open with nothing closed in it is still dropped whole, never completed.
    empty = parse("<|ref|>a<|/ref|><|det|>[[1,2<|ref|>b<|/ref|><|det|>[[5,6,7,8]]<|/det|>",
                  "deepseek-vl2")
    assert got(empty) == [B("b", 5, 6, 7, 8)] and empty.invalid == 1
    stopped = parse("<|ref|>a<|/ref|><|det|>[[1,2,3,4], [5<｜end▁of▁sentence｜>", "deepseek-vl2")
    assert got(stopped) == [B("a", 1, 2, 3, 4)] and stopped.truncated


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_objects_nested_in_an_object_are_objects_of_their_own(dialect):
    text = ('[{"label": "person", "bbox_2d": [100, 50, 300, 600], "parts": '
            '[{"label": "head", "bbox_2d": [150, 50, 250, 150]}]}, '
            '{"label": "dog", "bbox_2d": [400, 400, 500, 500]}]')
    assert got(parse(text, dialect)) == [B("person", 100, 50, 300, 600),
                                         B("head", 150, 50, 250, 150),
                                         B("dog", 400, 400, 500, 500)]
    in_prose = "Found " + text[1:-1].split(", {")[0] + " and more {"
    assert got(parse(in_prose, dialect)) == [B("person", 100, 50, 300, 600),
                                             B("head", 150, 50, 250, 150)]


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_a_wrappers_own_numbers_are_not_an_object(dialect):
    dog = '[{"label": "dog", "bbox": [10, 20, 110, 120]}]'
    for wrapper in (f'{{"wh": [640, 480], "objects": {dog}}}',
                    f'{{"counts": [3, 1, 0, 2], "objects": {dog}}}',
                    f'{{"meta": {{"size_hint": [1, 2]}}, "counts": [3, 1, 0, 2], '
                    f'"result": {{"objects": {dog}}}}}'):
        parsed = parse(wrapper, dialect)
        assert got(parsed) == [B("dog", 10, 20, 110, 120)] and parsed.invalid == 0
    # With a label of its own the wrapper is an object too, and so is a known key's box.
    labelled = f'{{"label": "pack", "where": [1, 2, 3, 4], "members": {dog}}}'
    assert got(parse(labelled, dialect)) == [B("pack", 1, 2, 3, 4), B("dog", 10, 20, 110, 120)]
    known = f'{{"bbox": [1, 2, 3, 4], "members": {dog}}}'
    assert got(parse(known, dialect)) == [B(None, 1, 2, 3, 4), B("dog", 10, 20, 110, 120)]


@pytest.mark.parametrize("dialect", JSON_DIALECTS)
def test_objects_lost_to_malformed_json_are_counted_invalid(dialect):
    good = '{"label": "c", "bbox_2d": [5, 6, 7, 8]}'
    for broken in ('{"label": "a\nb", "bbox_2d": [1, 2, 3, 4]}',  # newline inside a string
                   '{"label": "the "big" cat", "bbox_2d": [1, 2, 3, 4]}',  # inner quotes
                   '{"label": "a" "bbox_2d": [1, 2, 3, 4]}'):  # a missing comma
        parsed = parse(f"[{broken}, {good}]", dialect)
        assert got(parsed) == [B("c", 5, 6, 7, 8)] and parsed.invalid == 1, broken
    # An echoed format with no numbers in it is not a lost object.
    echoed = parse('Format: {"bbox_2d": [x1, y1, x2, y2], "label": ...}. ' + f"[{good}]",
                   dialect)
    assert got(echoed) == [B("c", 5, 6, 7, 8)] and echoed.invalid == 0
