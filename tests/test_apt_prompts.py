"""APT prompts: c* -> c, and the token alignment π (apt_ext/prompts.py). Tokenizers only, no models."""
import pytest
import torch

from apt_ext.prompts import (
    DROPPED,
    PromptError,
    alignment_for_batch,
    class_prompt,
    class_prompts,
    num_token_columns,
    resolve_prior_class_tokens,
    stitched_token_ids,
    token_alignment,
)
from library.clip_tokenizer import bundled_clip_tokenizer

N = 77


@pytest.fixture(scope="module")
def tok():
    return bundled_clip_tokenizer()


@pytest.fixture(scope="module")
def tok2():
    return bundled_clip_tokenizer(pad_token="!")  # SDXL's second tokenizer


# ---------------------------------------------------------------------------------------------------- class_prompt


def test_class_prompt_derived_first_word():
    assert class_prompt("a photo of sks dog", "sks dog") == "a photo of dog"
    assert class_prompt("sks teddy bear, on a table", "sks teddy bear") == "teddy bear, on a table"


def test_class_prompt_explicit_prior():
    assert class_prompt("ohwx man on a beach", "ohwx man", "person") == "person on a beach"
    assert class_prompt("a photo of sks", "sks", "dog") == "a photo of dog"


def test_class_prompt_multiple_occurrences_and_word_boundaries():
    cap = "sks dog, sks  dog and SKS dog; sks dogs, xsks dog"
    assert class_prompt(cap, "sks dog") == "dog, dog and dog; dogs, xsks dog"  # "sks dogs": the identifier dropped


def test_class_prompt_single_word_without_prior_is_an_error():
    with pytest.raises(PromptError, match="prior_class_tokens") as e:
        class_prompt("a photo of sks", "sks")
    assert isinstance(e.value, ValueError)
    assert "TOML" in str(e.value)
    with pytest.raises(PromptError, match="prior_class_tokens"):
        resolve_prior_class_tokens("sks dog", "  ")


def test_class_prompt_without_class_tokens_is_unchanged():
    assert class_prompt("a photo of sks dog", None) == "a photo of sks dog"
    assert class_prompt("a photo of sks dog", "") == "a photo of sks dog"
    assert class_prompt("", "sks dog") == ""  # caption dropout
    assert class_prompt("a photo of a cat", "sks dog") == "a photo of a cat"  # class tokens absent
    assert class_prompts(["sks dog", "x", "sks"], ["sks dog", None, "sks"], [None, None, "cat"]) == ["dog", "x", "cat"]


# ---------------------------------------------------------------------------------------------------- π


def _expected_sks_dog(mode):
    # c*: BOS a photo of sks dog EOS pad...   c: BOS a photo of dog EOS pad...
    pi = [0, 1, 2, 3, 4 if mode == "class" else DROPPED, 4, 5] + list(range(6, N - 1))
    assert len(pi) == N
    return torch.tensor(pi)


@pytest.mark.parametrize("mode", ["class", "drop"])
def test_alignment_sks_dog(tok, mode):
    (pi,) = alignment_for_batch([tok], ["a photo of sks dog"], ["a photo of dog"], mode)
    assert pi.shape == (1, N) and pi.dtype == torch.long
    assert torch.equal(pi[0], _expected_sks_dog(mode))
    # the same from the batch's class tokens (identifier and class known exactly)
    (pi2,) = alignment_for_batch([tok], ["a photo of sks dog"], ["a photo of dog"], mode, class_tokens=["sks dog"])
    assert torch.equal(pi2[0], _expected_sks_dog(mode))


def test_alignment_identity(tok):
    pis = alignment_for_batch([tok], ["", "a photo of a cat"], ["", "a photo of a cat"], "drop")
    assert torch.equal(pis[0], torch.arange(N).expand(2, N))
    assert torch.equal(token_alignment([1, 2, 3], [1, 2, 3]), torch.arange(3))


def test_alignment_explicit_prior_replace(tok):
    ft, pr = "ohwx man on a beach", "person on a beach"
    # BOS ohwx man on a beach EOS ... vs BOS person on a beach EOS ...: ohwx (identifier) and man -> person
    (pi,) = alignment_for_batch([tok], [ft], [pr], "class", class_tokens=["ohwx man"], prior_class_tokens=["person"])
    assert pi[0, :7].tolist() == [0, 1, 1, 2, 3, 4, 5]
    (pi,) = alignment_for_batch([tok], [ft], [pr], "drop", class_tokens=["ohwx man"], prior_class_tokens=["person"])
    assert pi[0, :7].tolist() == [0, DROPPED, 1, 2, 3, 4, 5]
    assert pi[0, 7:].tolist() == list(range(6, N - 1))


def test_alignment_multi_token_class_and_unmatched_rule():
    # ids: BOS=0, EOS=9; c* = BOS 5(sks) 6 7(teddy bear) 8 EOS; c = BOS 6 7 8 EOS EOS
    a, b = [0, 5, 6, 7, 8, 9], [0, 6, 7, 8, 9, 9]
    assert token_alignment(a, b).tolist() == [0, 1, 1, 2, 3, 4]  # identifier -> first column after the deletion
    assert token_alignment(a, b, [5], [6, 7]).tolist() == [0, 2, 1, 2, 3, 4]  # -> last token of the class
    # a deleted token that is not the identifier -> nearest preceding aligned column
    assert token_alignment([0, 3, 4, 5, 6, 9], [0, 3, 5, 6, 9, 9], identifier_ids=[1]).tolist() == [0, 1, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="apt_identifier_align"):
        token_alignment(a, b, mode="keep")


def test_alignment_multi_token_class_replaced_by_a_shorter_prior(tok):
    """"ohwx teddy bear" -> prior "toy" (docs/apt.md, π rule 4): the two class tokens of c* stretch onto the one
    prior token, floor(k*m/n) with n = 2, m = 1, so both read "toy"; "bear" must not shift onto "on", the next word,
    or L_attn would hold the subject's head noun to the attention of an unrelated word."""
    ft = "a photo of ohwx teddy bear on a table"
    pr = class_prompt(ft, "ohwx teddy bear", "toy")
    assert pr == "a photo of toy on a table"
    # c*: BOS0 a1 photo2 of3 ohwx4 teddy5 bear6 on7 a8 table9 EOS10 pad...; c: BOS0 a1 photo2 of3 toy4 on5 a6 table7
    # EOS8 pad... The diff replaces c* 4..6 by c 4: ohwx (identifier) -> last token of "toy" = 4 (drop: -1);
    # teddy k=0 -> 4 + floor(0*1/2) = 4, bear k=1 -> 4 + floor(1*1/2) = 4; then on..EOS and padding shift by 2.
    head = [0, 1, 2, 3, None, 4, 4, 5, 6, 7, 8]
    for mode, ident_col in (("class", 4), ("drop", DROPPED)):
        (pi,) = alignment_for_batch([tok], [ft], [pr], mode, class_tokens=["ohwx teddy bear"],
                                    prior_class_tokens=["toy"])
        assert pi[0, :11].tolist() == [ident_col if c is None else c for c in head]
        assert pi[0, 11:].tolist() == list(range(9, N - 2))


def test_alignment_identifier_between_two_equally_near_class_words(tok):
    """Tag-like caption "dog sks red dog" for "sks dog" -> c "dog red dog": the identifier's deletion point (c
    column 2) is one column from both "dog"s (1 and 3). π's tie-break (token_alignment: the nearest class
    occurrence, preferring one at or after the deletion point) sends sks to the later "dog", the one it precedes as
    in "sks dog"; taking the earlier one would flip with the caption's word order."""
    ft = "dog sks red dog"
    pr = class_prompt(ft, "sks dog")
    assert pr == "dog red dog"
    # c*: BOS0 dog1 sks2 red3 dog4 EOS5 pad...; c: BOS0 dog1 red2 dog3 EOS4 pad...
    (pi,) = alignment_for_batch([tok], [ft], [pr], "class", class_tokens=["sks dog"])
    assert pi[0].tolist() == [0, 1, 3, 2, 3] + list(range(4, N - 1))
    # the same on bare ids: identifier 5, class 6, deletion at c column 2 between class columns 1 and 3
    assert token_alignment([0, 6, 5, 8, 6, 9], [0, 6, 8, 6, 9, 9], [5], [6]).tolist() == [0, 1, 3, 2, 3, 4]


def test_identifier_is_found_whatever_the_case_of_the_class_word():
    """class_tokens "Dog sks" with prior "dog": the class word is "Dog" (CLIP lowercases it to the same token), so
    the identifier is "sks", not "Dog". Read case-sensitively, "Dog" would be taken for the identifier: a tag
    caption with "sks" alone would keep it in the prior prompt, and mode "drop" would not drop the identifier."""
    from apt_ext.prompts import identifier_word

    assert identifier_word("Dog sks", "dog") == "sks"
    assert identifier_word("sks Teddy BEAR", "teddy bear") == "sks"
    # tag caption without the class tokens: the identifier is replaced by the prior class (no class word present)
    assert class_prompt("sks, red", "Dog sks", "dog") == "dog, red"
    # drop mode: c* BOS0 a1 photo2 of3 dog4 sks5 EOS6 vs c BOS0 a1 photo2 of3 dog4 EOS5: sks is dropped (-1)
    tok = bundled_clip_tokenizer()
    ft = "a photo of Dog sks"
    pr = class_prompt(ft, "Dog sks", "dog")
    assert pr == "a photo of dog"
    (pi,) = alignment_for_batch([tok], [ft], [pr], "drop", class_tokens=["Dog sks"], prior_class_tokens=["dog"])
    assert pi[0].tolist() == [0, 1, 2, 3, 4, DROPPED] + list(range(5, N - 1))


def test_alignment_sdxl_two_tokenizers_agree(tok, tok2):
    ft = ["a photo of sks dog", "", "sks dog wearing a hat!", "ohwx man", "a photo of a cat"]
    pr = [class_prompt(c, ct, p) for c, ct, p in
          zip(ft, ["sks dog", "sks dog", "sks dog", "ohwx man", None], [None, None, None, "person", None])]
    ids1, ids2 = stitched_token_ids(tok, ft), stitched_token_ids(tok2, ft)
    assert not torch.equal(ids1, ids2)  # padding differs ("<|endoftext|>" vs "!")
    for mode in ("class", "drop"):
        pis = alignment_for_batch([tok, tok2], ft, pr, mode)
        assert len(pis) == 2 and pis[0].shape == pis[1].shape == (5, N)
        assert torch.equal(pis[0], pis[1])
    assert torch.equal(pis[0][0], _expected_sks_dog("drop"))
    assert torch.equal(pis[0][1], torch.arange(N))


def _sd_scripts_stitched(tokenizer, caption, max_token_length):
    """sd-scripts' get_input_ids (chunks of 77) followed by the re-stitching of get_hidden_states, on ids."""
    L = tokenizer.model_max_length
    ids = tokenizer(caption, padding="max_length", truncation=True, max_length=max_token_length + 2,
                    return_tensors="pt").input_ids[0]
    chunks = []
    for i in range(1, max_token_length + 2 - L + 2, L - 2):
        c = torch.cat([ids[:1], ids[i:i + L - 2], ids[-1:]])
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            if c[-2] != tokenizer.eos_token_id and c[-2] != tokenizer.pad_token_id:
                c[-1] = tokenizer.eos_token_id
            # (sd-scripts also feeds an all-padding chunk as <BOS> <EOS> <PAD>...; stitched_token_ids keeps that
            # column's PAD id on purpose, see its docstring)
        chunks.append(c)
    flat = torch.cat(chunks)
    cols = [flat[0:1]] + [flat[i:i + L - 2] for i in range(1, max_token_length, L)] + [flat[-1:]]
    return torch.cat(cols)


def test_alignment_long_prompt_150(tok, tok2):
    words = "red green blue small large old new happy quiet bright dark soft warm cold wet dry".split()
    prefix = " ".join(words[i % len(words)] + ("," if i % 5 == 4 else "") for i in range(70))
    ft = [prefix + " sks dog on a sunny beach near the sea", "a photo of sks dog"]
    pr = [class_prompt(c, "sks dog") for c in ft]
    assert num_token_columns(tok, 150) == 152 and num_token_columns(tok, None) == 77
    ids = stitched_token_ids(tok, ft, 150)
    assert ids.shape == (2, 152)
    for t in (tok, tok2):
        for cap in ft + ["", prefix * 3]:
            assert torch.equal(stitched_token_ids(t, [cap], 150)[0], _sd_scripts_stitched(t, cap, 150))
    pis = alignment_for_batch([tok, tok2], ft, pr, "class", max_token_length=150)
    assert torch.equal(pis[0], pis[1]) and pis[0].shape == (2, 152)
    pi = pis[0][0]
    k = ids[0].tolist().index(tok.convert_tokens_to_ids("sks</w>"))
    assert k > 76  # the identifier sits in the second chunk
    expected = list(range(k)) + [k, k] + list(range(k + 1, 151))
    assert pi.tolist() == expected
    pi_short = pis[0][1]
    assert pi_short[:6].tolist() == [0, 1, 2, 3, 4, 4] and pi_short[6:76].tolist() == list(range(5, 75))
    # [ours] the second chunk is all padding in c* and c alike, encoded on its own to the same states: its columns
    # and the final one map to themselves (the diff shifted them by the identifier's removal: 76 -> 75, ...)
    assert pi_short[76:].tolist() == list(range(76, 152))
    with pytest.raises(ValueError, match="multiple"):
        num_token_columns(tok, 100)


def test_captions_without_the_class_tokens_are_reported_per_subset():
    """Captions naming neither "sks dog" nor "sks", and subsets without class tokens (a fine-tuning subset cannot
    set them), keep c = c*: the warning says so, per subset, with what to do. Tag captions with the identifier, a
    prefix that brings the class tokens, and reg images are not reported."""
    from types import SimpleNamespace as NS

    from apt_ext.prompts import captions_without_class_tokens

    def subset(i, class_tokens="sks dog", prefix=None, metadata_file=None, wildcard=False):
        return NS(where=f"datasets[0].subsets[{i}] in d.toml", class_tokens=class_tokens, prior_class_tokens=None,
                  caption_prefix=prefix, caption_suffix=None, metadata_file=metadata_file, enable_wildcard=wildcard)

    tags, prefixed = subset(0), subset(1, prefix="sks dog,")
    no_class, ft = subset(2, None), subset(3, None, metadata_file="m.json")
    images = [NS(key="a.png", caption="red, outdoors", is_reg=False, subset=tags),
              NS(key="b.png", caption="a photo of SKS  Dog", is_reg=False, subset=tags),  # found: case, spaces
              NS(key="c.png", caption="sks, dog", is_reg=False, subset=tags),  # the identifier: dropped
              NS(key="d.png", caption="xsks dogs", is_reg=False, subset=tags),  # whole words only
              NS(key="e.png", caption="red, grass", is_reg=False, subset=prefixed),
              NS(key="f.png", caption="a dog", is_reg=True, subset=tags),
              NS(key="g.png", caption="a dog", is_reg=False, subset=no_class),
              NS(key="h.png", caption="sks dog", is_reg=False, subset=ft)]
    why = ("its class prompt c is each caption itself, the prior and fine-tuned passes read the same prompt, and APT "
           "holds the LoRA to what the base model makes of it. APT needs class_tokens and prior_class_tokens (e.g. "
           "\"sks dog\" and \"dog\"): ")
    assert captions_without_class_tokens(images) == [
        "datasets[0].subsets[0] in d.toml: 2 of 4 captions name neither class_tokens 'sks dog' nor the identifier "
        "'sks' (e.g. a.png: 'red, outdoors'). For these APT's class prompt c is the caption itself, so the prior and "
        "fine-tuned passes read the same prompt and APT holds the LoRA to what the base model makes of it. Write "
        "'sks dog' in those captions (tag captions: as one tag, first with keep_tokens = 1), or set "
        "caption_prefix = \"sks dog,\" for the subset.",
        "datasets[0].subsets[2] in d.toml: no class_tokens, so APT cannot tell the subject's identifier in its 1 "
        "captions: " + why + "set them for the subset.",
        "datasets[0].subsets[3] in d.toml: no class_tokens, so APT cannot tell the subject's identifier in its 1 "
        "captions: " + why + "put its images in a DreamBooth subset (image_dir with caption files) that sets them."]
    assert captions_without_class_tokens(images[1:3] + images[4:6]) == []
    # enable_wildcard: one line or one {a|b} choice is drawn per step; a draw without them is reported (the raw
    # text, or "\s+" matching across the line break, hid them)
    wild = subset(4, wildcard=True)
    drawn = [NS(key=k, caption=c, is_reg=False, subset=wild) for k, c in [
        ("w1.png", "a photo of {sks dog|a dog}"), ("w2.png", "sks dog on grass\nthe dog on grass"),
        ("w3.png", "portrait of sks\ndog park"), ("w4.png", "a photo of {sks dog|the sks dog}\nsks dog, {red|blue}")]]
    (line,) = captions_without_class_tokens(drawn)
    assert line.startswith("datasets[0].subsets[4] in d.toml: 3 of 4 captions name neither") and "w1.png" in line


@pytest.mark.parametrize("caption, c", [
    ("sks, dog, red", "dog, red"), ("red, sks, dog", "red, dog"), ("red, dog, SKS", "red, dog"),
    ("(sks:1.2), dog", "dog"), ("sksy, dog", "sksy, dog"),
    # no class word left (tag dropout took "dog"): the identifier becomes the class, so that c names it
    ("a photo of sks on grass", "a photo of dog on grass"), ("sks, red, grass", "dog, red, grass"),
    ("red; sks; dog; grass", "red; dog; grass"), ("dog| red| grass| sks", "dog| red| grass")])  # caption_separator
def test_tag_captions_without_the_class_tokens_drop_the_identifier_tag(caption, c):
    """[ours] "sks, dog" holds no "sks dog": c = c* would show the prior pass the identifier; the identifier is
    dropped with its tag instead, or replaced by the prior class tokens where no class word is left (it was
    dropped too: c named no class, "sks, red" -> "red", while class tokens "sks" + prior "dog" gave "dog, red").
    Where the class tokens occur they are replaced as before, and an identifier left beside them is dropped."""
    assert class_prompt(caption, "sks dog") == c
    assert class_prompt("ohwx, smiling", "ohwx man", "person") == "person, smiling"
    assert class_prompt("ohwx, man, smiling", "ohwx man", "person") == "man, smiling"
    assert class_prompt("ohwx, a person, smiling", "ohwx man", "person") == "a person, smiling"
    assert class_prompt("sks, red", "sks", "dog") == class_prompt("sks, red", "sks dog") == "dog, red"
    # the class tokens found: replaced, and an identifier left beside them dropped (c never holds it)
    assert class_prompt("sks dog, sks", "sks dog") == "dog"
    assert class_prompt("sks dog, sks, red", "sks dog") == "dog, red"
    assert class_prompt("ohwx man, ohwx, smiling", "ohwx man", "person") == "person, smiling"


def test_the_trainer_warns_of_captions_without_the_class_tokens_before_training(tiny, images, tmp_path, caplog):
    import shutil

    import train_apt_lora
    from tests.test_train_e2e import _dataset

    photos = tmp_path / "photos"
    shutil.copytree(images, photos)
    for p in photos.glob("*.png"):
        p.with_suffix(".txt").write_text("a dog, outdoors")
    argv = ["--pretrained_model_name_or_path", tiny["sd1"], "--dataset_config",
            _dataset(tmp_path, photos.as_posix(), caption_extension=".txt"), "--debug_dataset"]
    assert train_apt_lora.main(argv) == 0
    assert "3 of 3 captions name neither class_tokens 'sks dog'" not in caplog.text  # APT off: c is not used
    assert "class prompt c replaces" not in caplog.text
    assert train_apt_lora.main(argv + ["--apt"]) == 0
    assert "3 of 3 captions name neither class_tokens 'sks dog' nor the identifier 'sks'" in caplog.text
    assert ("class prompt c replaces 'sks dog' by 'dog' (the words after the identifier 'sks'; set "
            "prior_class_tokens if not), e.g. 'a dog, outdoors' -> 'a dog, outdoors'") in caplog.text


def test_the_class_prompt_of_each_subset_is_shown_once_with_an_example():
    """The start-of-run line per training subset: the replacement, where the prior class tokens come from (a
    guess from the word order is named as such: "dog sks" would make "dog" the identifier), one caption before
    and after. Reg subsets and subsets without class tokens get none."""
    from types import SimpleNamespace as NS

    from apt_ext.prompts import class_prompt_examples

    def subset(i, class_tokens, prior=None, prefix=None):
        return NS(where=f"subsets[{i}]", class_tokens=class_tokens, prior_class_tokens=prior, caption_prefix=prefix,
                  caption_suffix=None)

    guessed, given, none = subset(0, "dog sks"), subset(1, "ohwx man", "person", prefix="photo,"), subset(2, None)
    images = [NS(caption="a dog sks on grass", is_reg=False, subset=guessed),
              NS(caption="another", is_reg=False, subset=guessed),
              NS(caption="ohwx man smiling", is_reg=False, subset=given),
              NS(caption="a man", is_reg=True, subset=subset(3, "man")),
              NS(caption="a cat", is_reg=False, subset=none)]
    assert class_prompt_examples(images) == [
        "APT: subsets[0]: class prompt c replaces 'dog sks' by 'sks' (the words after the identifier 'dog'; set "
        "prior_class_tokens if not), e.g. 'a dog sks on grass' -> 'a sks on grass'",
        "APT: subsets[1]: class prompt c replaces 'ohwx man' by 'person' (prior_class_tokens), e.g. "
        "'photo, ohwx man smiling' -> 'photo, person smiling'"]


def test_the_dropped_identifier_tag_aligns_with_the_class_column():
    """"sks, dog, red" vs "dog, red": the identifier's column maps onto "dog" (mode class) or is left out (drop);
    its comma onto the column before; the rest in order."""
    tok = bundled_clip_tokenizer()
    ft = ["sks, dog, red"]
    pr = class_prompts(ft, ["sks dog"])
    assert pr == ["dog, red"]
    # c* columns: BOS sks , dog , red EOS pad...; c columns: BOS dog , red EOS pad...
    (pi,) = alignment_for_batch([tok], ft, pr, mode="class", class_tokens=["sks dog"], prior_class_tokens=[None])
    assert pi[0, :8].tolist() == [0, 1, 1, 1, 2, 3, 4, 5]
    (pi,) = alignment_for_batch([tok], ft, pr, mode="drop", class_tokens=["sks dog"], prior_class_tokens=[None])
    assert pi[0, :8].tolist() == [0, DROPPED, 0, 1, 2, 3, 4, 5]
