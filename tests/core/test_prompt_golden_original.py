"""Golden rows produced by the ORIGINAL ConsistentID functions, frozen here.

During development each row's expected values were computed by running the original code
(``functions.process_text_with_markers``, ``tokenize_and_mask_noun_phrases_ends``,
``prepare_image_token_idx``, the SD1.5/SDXL pipelines' ``encode_prompt_with_trigger_word`` and
``get_prepare_facemask`` logic, and ``utils.MyDataset``'s caption assembly) with a CLIP tokenizer
that had ``<|image|>`` and ``<|facial|>`` added, as the original does. The same comparison on
thousands of random captions found no difference; these rows keep the interesting ones in CI.

``ids`` / ``text_only_ids`` are space-separated token ids with the trailing 49407s (EOS = pad for
SD1.5) removed; the rest of the 77 positions is 49407.
"""

from typing import NamedTuple

import pytest

from consistentid_core.prompt import CLIP_CONTEXT_LENGTH, build_facial_prompt, build_training_prompt
from tests.fixtures.clip_tokenizer import clip_tokenizer

PAD = 49407


class GoldenRow(NamedTuple):
    prompt: str
    caption: str
    labels: list
    detail_prefix: str
    marked_text: str
    ids: str
    text_only_ids: str
    facial_positions: list
    region_labels: list


class TrainingRow(NamedTuple):
    detail_caption: str
    caption: str
    labels: list
    drop_text: bool
    marked_text: str
    ids: str
    text_only_ids: str
    facial_positions: list
    region_labels: list


INFERENCE_ROWS = [
    GoldenRow(
        prompt='a photo of a woman',
        caption='The person has one face, one nose, two eyes, two ears, and one mouth.',
        labels=[0, 1, 2, 3, 4, 5, 7, 8, 10, 12, 13, 17],
        detail_prefix='Detail:',
        marked_text='a photo of a womanDetail:The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, one nose <|facial|>, and one mouth <|facial|>,',
        ids='49406 320 1125 539 320 15716 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 637 4932 267',
        text_only_ids='49406 320 1125 539 320 15716 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 637 4932 267',
        facial_positions=[12, 15, 18, 21, 25],
        region_labels=[1, 4, 7, 10, 12],
    ),
    GoldenRow(
        prompt='a photo of a woman',
        caption='The person has one face, one nose, two eyes, two ears, and one mouth.',
        labels=[1, 5, 8, 10, 13],
        detail_prefix='Detail:',
        marked_text='a photo of a womanDetail:The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, one nose <|facial|>, and one mouth <|facial|>,',
        ids='49406 320 1125 539 320 15716 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 637 4932 267',
        text_only_ids='49406 320 1125 539 320 15716 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 637 4932 267',
        facial_positions=[12, 15, 18, 21, 25],
        region_labels=[1, 5, 8, 10, 13],
    ),
    GoldenRow(
        prompt='',
        caption='The person has one face, one nose, two eyes, two ears, and one mouth.',
        labels=[4, 7],
        detail_prefix='Detail:',
        marked_text='Detail:two ears <|facial|>, two eyes <|facial|>,',
        ids='49406 7657 281 1237 9861 267 1237 3095 267',
        text_only_ids='49406 7657 281 1237 9861 267 1237 3095 267',
        facial_positions=[4, 7],
        region_labels=[4, 7],
    ),
    GoldenRow(
        prompt='portrait',
        caption='The person has one face, one nose, two eyes, two ears, and one mouth.',
        labels=[],
        detail_prefix='Detail:',
        marked_text='portraitDetail:',
        ids='49406 39312 7657 281',
        text_only_ids='49406 39312 7657 281',
        facial_positions=[],
        region_labels=[],
    ),
    GoldenRow(
        prompt='portrait',
        caption='A smiling man with short hair.',
        labels=[1, 4, 7, 10, 12],
        detail_prefix='Detail:',
        marked_text='portraitDetail:',
        ids='49406 39312 7657 281',
        text_only_ids='49406 39312 7657 281',
        facial_positions=[],
        region_labels=[],
    ),
    GoldenRow(
        prompt='portrait',
        caption='Her Eyes are blue, her eyes are big, her Nose is small and her mouth is wide.',
        labels=[1, 4, 10, 12],
        detail_prefix='Detail:',
        marked_text='portraitDetail:her Nose is small and her mouth <|facial|> is wide,',
        ids='49406 39312 7657 281 899 8231 533 2442 537 899 4932 533 3184 267',
        text_only_ids='49406 39312 7657 281 899 8231 533 2442 537 899 4932 533 3184 267',
        facial_positions=[10],
        region_labels=[12],
    ),
    GoldenRow(
        prompt='portrait',
        caption='face face eyes Eyes EYES nose, mouth mouth.',
        labels=[1, 4, 10, 12],
        detail_prefix='Detail:',
        marked_text='portraitDetail:face <|facial|>  eyes <|facial|>   nose <|facial|>, mouth <|facial|>,',
        ids='49406 39312 7657 281 1710 3095 8231 267 4932 267',
        text_only_ids='49406 39312 7657 281 1710 3095 8231 267 4932 267',
        facial_positions=[4, 5, 6, 8],
        region_labels=[1, 4, 10, 12],
    ),
    GoldenRow(
        prompt='portrait',
        caption='The eyes and the nose are small, the mouth is wide',
        labels=[4, 10, 12],
        detail_prefix='Detail:',
        marked_text='portraitDetail:The eyes <|facial|> and the nose <|facial|> are small, e, the mouth <|facial|> is wid,',
        ids='49406 39312 7657 281 518 3095 537 518 8231 631 2442 267 324 267 518 4932 533 20886 267',
        text_only_ids='49406 39312 7657 281 518 3095 537 518 8231 631 2442 267 324 267 518 4932 533 20886 267',
        facial_positions=[5, 8, 15],
        region_labels=[4, 10, 12],
    ),
    GoldenRow(
        prompt='portrait',
        caption='round face\nlarge ears\nnarrow eyes',
        labels=[1, 4, 7, 10],
        detail_prefix='Detail:',
        marked_text='portraitDetail:round face <|facial|> large ears <|facial|> narrow eyes <|facial|>,',
        ids='49406 39312 7657 281 2522 1710 3638 9861 16652 3095 267',
        text_only_ids='49406 39312 7657 281 2522 1710 3638 9861 16652 3095 267',
        facial_positions=[5, 7, 9],
        region_labels=[1, 4, 7],
    ),
    GoldenRow(
        prompt='portrait',
        caption='a face with eyes',
        labels=[1, 4, 7],
        detail_prefix='Detail:',
        marked_text='portraitDetail:a face <|facial|> with eyes <|facial|>,',
        ids='49406 39312 7657 281 320 1710 593 3095 267',
        text_only_ids='49406 39312 7657 281 320 1710 593 3095 267',
        facial_positions=[5, 7],
        region_labels=[1, 4],
    ),
    GoldenRow(
        prompt='a woman in a red dress standing on a beach at sunset, highly detailed, masterpiece, best quality, ultra realistic, 8k, sharp focus, soft light, film grain, bokeh background, wearing a hat',
        caption='The person has one face, one nose, two eyes, two ears, and one mouth.',
        labels=[1, 4, 7, 10, 12],
        detail_prefix='Detail:',
        marked_text='a woman in a red dress standing on a beach at sunset, highly detailed, masterpiece, best quality, ultra realistic, 8k, sharp focus, soft light, film grain, bokeh background, wearing a hatDetail:The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, one nose <|facial|>, and one mouth <|facial|>,',
        ids='49406 320 2308 530 320 736 2595 2862 525 320 2117 536 3424 267 5302 12609 267 12066 267 949 3027 267 8118 16157 267 279 330 267 8157 4353 267 3773 1395 267 1860 12109 267 647 36983 5994 267 3309 320 3447 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 637 4932 267',
        text_only_ids='49406 320 2308 530 320 736 2595 2862 525 320 2117 536 3424 267 5302 12609 267 12066 267 949 3027 267 8118 16157 267 279 330 267 8157 4353 267 3773 1395 267 1860 12109 267 647 36983 5994 267 3309 320 3447 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 637 4932 267',
        facial_positions=[50, 53, 56, 59, 63],
        region_labels=[1, 4, 7, 10, 12],
    ),
    GoldenRow(
        prompt='a photo',
        caption='The person has one face, one nose, two eyes, two ears, and one mouth. The person has one face, one nose, two eyes, two ears, and one mouth. The person has one face, one nose, two eyes, two ears, and one mouth. The person has one face, one nose, two eyes, two ears, and one mouth. The person has one face, one nose, two eyes, two ea',
        labels=[1, 4, 7, 10, 12],
        detail_prefix='Detail:',
        marked_text='a photo',
        ids='49406 320 1125',
        text_only_ids='49406 320 1125',
        facial_positions=[],
        region_labels=[],
    ),
    GoldenRow(
        prompt='a photo',
        caption='a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a face, b b b b b b b b b b nose, eyes, mouth',
        labels=[1, 4, 10, 12],
        detail_prefix='Detail:',
        marked_text='Detail:a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a face <|facial|>, eyes <|facial|>, b b b b b b b b b b nose <|facial|>, mouth <|facial|>, Caption:a photo',
        ids='49406 7657 281 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 1710 267 3095 267 321 321 321 321 321 321 321 321 321 321',
        text_only_ids='49406 7657 281 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 320 1710 267 3095 267 321 321 321 321 321 321 321 321 321',
        facial_positions=[63, 65],
        region_labels=[1, 4],
    ),
    GoldenRow(
        prompt='a photo of a man',
        caption='The person has one face, one nose, two eyes, two ears, and a mouth.',
        labels=[1, 4, 7, 10, 12],
        detail_prefix='; Detail:',
        marked_text='a photo of a man; Detail:The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, one nose <|facial|>, and a mouth <|facial|>,',
        ids='49406 320 1125 539 320 786 282 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 320 4932 267',
        text_only_ids='49406 320 1125 539 320 786 282 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 320 4932 267',
        facial_positions=[13, 16, 19, 22, 26],
        region_labels=[1, 4, 7, 10, 12],
    ),
]
TRAINING_ROWS = [
    TrainingRow(
        detail_caption='The person has one face, one nose, two eyes, two ears, and one mouth.',
        caption='A woman smiling at the camera. She wears a red scarf.',
        labels=[1, 4, 7, 10, 12],
        drop_text=False,
        marked_text='Caption:A woman smiling at the camera. Detail:The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, one nose <|facial|>, and one mouth <|facial|>, She wears a red scarf',
        ids='49406 11327 281 320 2308 9200 536 518 3934 269 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 637 4932 267 1043 11869 320 736 13365',
        text_only_ids='49406 11327 281 320 2308 9200 536 518 3934 269 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 637 4932 267 1043 11869 320 736 13365',
        facial_positions=[16, 19, 22, 25, 29],
        region_labels=[1, 4, 7, 10, 12],
    ),
    TrainingRow(
        detail_caption='Her eyes are green and her nose is straight.',
        caption='  A man. Outdoors',
        labels=[1, 5, 10],
        drop_text=False,
        marked_text='Caption:A man. Detail:Her eyes <|facial|> are green and her nose <|facial|> is straight, .,n. Outdoor',
        ids='49406 11327 281 320 786 269 7657 281 899 3095 631 1901 537 899 8231 533 4241 267 5276 333 269 6368',
        text_only_ids='49406 11327 281 320 786 269 7657 281 899 3095 631 1901 537 899 8231 533 4241 267 5276 333 269 6368',
        facial_positions=[9, 14],
        region_labels=[5, 10],
    ),
    TrainingRow(
        detail_caption='The person has one face, one nose, two eyes, two ears, and one mouth.',
        caption='A portrait',
        labels=[1, 4],
        drop_text=False,
        marked_text='Caption:A portrait Detail:The person has one face <|facial|>, two eyes <|facial|>,',
        ids='49406 11327 281 320 5352 7657 281 518 2533 791 637 1710 267 1237 3095 267',
        text_only_ids='49406 11327 281 320 5352 7657 281 518 2533 791 637 1710 267 1237 3095 267',
        facial_positions=[11, 14],
        region_labels=[1, 4],
    ),
    TrainingRow(
        detail_caption='The person has one face, one nose, two eyes, two ears, and one mouth.',
        caption='a woman in a red dress standing on a beach at sunset, highly detailed, masterpiece, best quality, ultra realistic, 8k, sharp focus, soft light, film grain, bokeh background, wearing a hat. a woman in a red dress standing on a beach at sunset, highly detailed, masterpiece, best quality, ultra realistic, 8k, sharp focus, soft light, film grain, bokeh background, wearing a hat',
        labels=[1, 4, 7, 10, 12],
        drop_text=False,
        marked_text='Detail:The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, one nose <|facial|>, and one mouth <|facial|>, Caption:a woman in a red dress standing on a beach at sunset, highly detailed, masterpiece, best quality, ultra realistic, 8k, sharp focus, soft light, film grain, bokeh background, wearing a hat. a woman in a red dress standing on a beach at sunset, highly detailed, masterpiece, best quality, ultra realistic, 8k, sharp focus, soft light, film grain, bokeh background, wearing a hat',
        ids='49406 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 637 4932 267 11327 281 320 2308 530 320 736 2595 2862 525 320 2117 536 3424 267 5302 12609 267 12066 267 949 3027 267 8118 16157 267 279 330 267 8157 4353 267 3773 1395 267 1860 12109 267 647 36983 5994 267 3309 320 3801 269 320 2308 530 320 736 2595 2862 525 320',
        text_only_ids='49406 7657 281 518 2533 791 637 1710 267 1237 9861 267 1237 3095 267 637 8231 267 537 637 4932 267 11327 281 320 2308 530 320 736 2595 2862 525 320 2117 536 3424 267 5302 12609 267 12066 267 949 3027 267 8118 16157 267 279 330 267 8157 4353 267 3773 1395 267 1860 12109 267 647 36983 5994 267 3309 320 3801 269 320 2308 530 320 736 2595 2862 525',
        facial_positions=[7, 10, 13, 16, 20],
        region_labels=[1, 4, 7, 10, 12],
    ),
    TrainingRow(
        detail_caption='The face is oval and very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very very soft, the nose is small.',
        caption='A portrait.',
        labels=[1, 10],
        drop_text=False,
        marked_text='A portrait.',
        ids='49406 320 5352 269',
        text_only_ids='49406 320 5352 269',
        facial_positions=[],
        region_labels=[],
    ),
    TrainingRow(
        detail_caption='The person has one face, one nose, two eyes, two ears, and one mouth.',
        caption='A woman. Indoors.',
        labels=[1, 4, 7, 10, 12],
        drop_text=True,
        marked_text='',
        ids='49406',
        text_only_ids='49406',
        facial_positions=[],
        region_labels=[],
    ),
]


def _padded(ids: str) -> tuple:
    values = [int(token) for token in ids.split()]
    return tuple(values + [PAD] * (CLIP_CONTEXT_LENGTH - len(values)))


def _check(result, row) -> None:
    assert result.marked_text == row.marked_text
    assert result.input_ids == _padded(row.ids)
    assert result.text_only_input_ids == _padded(row.text_only_ids)
    assert [i for i, marked in enumerate(result.facial_token_mask) if marked] == row.facial_positions
    assert list(result.region_labels) == row.region_labels
    assert result.num_valid_slots == len(row.facial_positions)


@pytest.mark.parametrize("row", INFERENCE_ROWS, ids=lambda row: f"{row.prompt[:12]}|{row.caption[:24]}")
def test_inference_prompt_matches_original_output(row):
    """build_facial_prompt reproduces the original pipeline's ids, mask and crop pairing."""
    result = build_facial_prompt(
        row.prompt, row.caption, row.labels, clip_tokenizer(), detail_prefix=row.detail_prefix
    )
    _check(result, row)


@pytest.mark.parametrize("row", TRAINING_ROWS, ids=lambda row: f"{row.detail_caption[:16]}|{row.caption[:16]}")
def test_training_prompt_matches_original_dataset_output(row):
    """build_training_prompt reproduces the original dataset's text, ids, mask and pairing."""
    result = build_training_prompt(
        row.detail_caption, row.caption, row.labels, clip_tokenizer(), drop_text=row.drop_text
    )
    _check(result, row)
