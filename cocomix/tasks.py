"""
The benchmark files scripts/eval.py scores, read into (context, continuation) string pairs. JSON
Lines, one reader per format, the format recognised from the first object's keys; the queries are
built as lm-eval's task files build them:
  {"query", "choices", "gold"}        as given (lm-eval and llm-foundry files). llm-foundry's ARC
                                      and PIQA queries ("Question: ...") lack the answer prompt
                                      their task files add: "\\nAnswer:" is appended to a query
                                      that starts with "Question:" and does not end with "Answer:"
                                      (lm-eval's prompt).
  {"context_options", "continuation", "gold"}  WinoGrande / Winograd (llm-foundry)
  {"sentence", "option1", "option2", "answer"}  WinoGrande (Hugging Face), answer "1" or "2"
  {"ctx_a", "ctx_b" | "ctx", "endings", "label"} HellaSwag: query = activity_label + ": " + ctx_a +
                                      " " + ctx_b.capitalize(); query and endings lose " [title]"
                                      (-> ". "), other [bracketed] WikiHow markup and double spaces
  {"context", "question", "answerA", "answerB", "answerC", "label"}  SIQA, label 1-based:
                                      "Q: {context} {question}\\nA:"
  {"question", "choices", "answerKey"} ARC (Hugging Face; or AI2's
                                      {"question": {"stem", "choices"}}):
                                      "Question: {question}\\nAnswer:"
  {"goal", "sol1", "sol2", "label"}   PIQA: "Question: {goal}\\nAnswer:"
  {"text"} / {"context", "continuation"}  LAMBADA (the pair joined by one space)
  {"page"}                            WikiText articles
Refused by name, not read as the format whose keys they share (refused_format): CommonsenseQA
(Hugging Face's or the original form, ARC's keys), OpenBookQA (Hugging Face's or AI2's form), MMLU.
"""

import gzip
import json
import os
import re


class EvalError(Exception):
    """An expected failure (bad input file, wrong data): main prints it as one line and exits 1."""


def benchmark_ext(path):
    """A benchmark file's extension, lower case, that of its content for a .gz file: '.jsonl' for
    both arc.jsonl and arc.jsonl.gz."""
    name = os.path.basename(os.fspath(path)).lower()
    return os.path.splitext(name.removesuffix(".gz"))[1]


def read_text(path):
    """A benchmark file's text as lm-eval's loader reads it: UTF-8 with a leading BOM dropped (a
    Windows editor's leftover), a .gz file as its content, and universal newlines as Python's text
    mode ("\r\n" and a lone "\r" become "\n"), so a CRLF or BOM copy of a file scores as the file
    does. A one-line EvalError if unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if os.fspath(path).lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:  # EOFError: a gzip stream cut short
        raise EvalError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text (byte offset {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl(path, max_examples=None):
    """The (line number, object) pairs of a JSONL file, read by read_text (blank lines skipped);
    errors name the file and line."""
    items = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise EvalError(f"{path}:{lineno}: malformed JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(item, dict):
            raise EvalError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
        items.append((lineno, item))
        if max_examples is not None and len(items) >= max_examples:
            break
    if not items:
        raise EvalError(f"{path}: no examples")
    return items


# Each reader turns one JSON object into (pairs, gold, lengths): the (context, continuation) strings
# of its choices, the index of the right one, and the choices' lengths for acc_norm (None: acc
# only). A bad value raises ValueError with the reason; the caller adds the file and line.


def as_index(item, key, n, base=0):
    """item[key] (gold, label or answer) as an index into n choices: an int or a digit string, base
    0 or 1."""
    value = item[key]
    i = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i - base < n:
        raise ValueError(
            f"{key}={value!r} is not an index into its {n} choices" + (" (1-based)" if base else "")
        )
    return i - base


def strings(*values):
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError("expected non-empty strings")
    return values


def choice_pairs(query, choices, sep=" "):
    return [(query, sep + c) for c in choices], [len(c) for c in choices]


def read_query_choices(item, sep):
    q, choices = item["query"], item["choices"]
    if (
        not isinstance(q, str)
        or not isinstance(choices, list)
        or not choices
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise ValueError("'query' must be a string and 'choices' a list of non-empty strings")
    gold = as_index(item, "gold", len(choices))
    if sep and all(c[0].isspace() for c in choices):
        # an older convention of this evaluation (the space inside the choice): with a separator
        # too it would be doubled
        raise ValueError(
            f"every choice starts with whitespace and the separator is {sep!r}: strip the choices, "
            "or pass --mc_sep='' to use them as they are"
        )
    if q.startswith("Question:") and not q.rstrip().endswith("Answer:"):
        # llm-foundry's ARC/PIQA files: their task adds this answer prompt
        q = q.rstrip() + "\nAnswer:"
    pairs, lengths = choice_pairs(q, choices, sep)
    return pairs, gold, lengths


def read_schema(item, sep):
    options, cont = item["context_options"], item["continuation"]
    if (
        not isinstance(options, list)
        or not options
        or not all(isinstance(o, str) and o for o in options)
        or not isinstance(cont, str)
        or not cont.strip()
    ):
        raise ValueError(
            "'context_options' must be a list of non-empty "
            "strings and 'continuation' a non-empty string"
        )
    return [(o, " " + cont.strip()) for o in options], as_index(item, "gold", len(options)), None


def read_winogrande(item, sep):
    sentence, *options = strings(item["sentence"], item["option1"], item["option2"])
    if "_" not in sentence:
        raise ValueError("'sentence' has no '_' to fill in")
    i = sentence.index("_")
    cont = " " + sentence[i + 1 :].strip()
    return [(sentence[:i] + o, cont) for o in options], as_index(item, "answer", 2, base=1), None


def hellaswag_clean(text):
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def read_hellaswag(item, sep):
    if "ctx_a" in item and "ctx_b" in item:
        # capitalize() lowercases the rest: as lm-eval
        ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize()
    elif "ctx" in item:
        ctx = item["ctx"]
    else:
        raise ValueError("expected 'ctx_a' and 'ctx_b', or 'ctx'")
    endings = item["endings"]
    if (
        not isinstance(ctx, str)
        or not isinstance(endings, list)
        or not endings
        or not all(isinstance(e, str) for e in endings)
    ):
        raise ValueError("the context must be a string and 'endings' a list of strings")
    if "activity_label" in item:
        ctx = item["activity_label"] + ": " + ctx
    pairs, lengths = choice_pairs(hellaswag_clean(ctx), [hellaswag_clean(e) for e in endings])
    return pairs, as_index(item, "label", len(endings)), lengths


def read_siqa(item, sep):
    context, question, *choices = strings(
        item["context"], item["question"], item["answerA"], item["answerB"], item["answerC"]
    )
    pairs, lengths = choice_pairs(f"Q: {context} {question}\nA:", choices)
    return pairs, as_index(item, "label", 3, base=1), lengths


def read_arc(item, sep):
    q = item["question"]
    # AI2's release nests them
    choices = q.get("choices") if isinstance(q, dict) else item.get("choices")
    if isinstance(choices, dict):  # Hugging Face: {"text": [...], "label": [...]}
        texts, labels = choices.get("text"), choices.get("label")
    elif isinstance(choices, list) and all(isinstance(c, dict) for c in choices):
        texts, labels = [c.get("text") for c in choices], [c.get("label") for c in choices]
    else:
        texts = labels = None
    if (
        not isinstance(texts, list)
        or not isinstance(labels, list)
        or len(texts) != len(labels)
        or not texts
    ):
        raise ValueError(
            "expected 'choices' as {'text': [...], 'label': [...]} or a list of {'text', 'label'}"
        )
    stem = q.get("stem") if isinstance(q, dict) else q
    strings(stem, *texts)
    if item["answerKey"] not in labels:
        raise ValueError(
            f"answerKey {item['answerKey']!r} is not one of the choices' labels {labels!r}"
        )
    pairs, lengths = choice_pairs(f"Question: {stem}\nAnswer:", texts)
    return pairs, labels.index(item["answerKey"]), lengths


def read_piqa(item, sep):
    goal, *choices = strings(item["goal"], item["sol1"], item["sol2"])
    pairs, lengths = choice_pairs(f"Question: {goal}\nAnswer:", choices)
    return pairs, as_index(item, "label", 2), lengths


def read_lambada_text(item, sep):
    text = item["text"]
    if not isinstance(text, str) or " " not in text:
        raise ValueError("'text' must be a string with a space before its last word")
    context, word = text.rsplit(" ", 1)  # as lm-eval: no stripping
    # every LAMBADA passage ends in its target word; WikiText's {"text"} rows end in "\n" or " ."
    if text != text.rstrip() or not re.search(r"\w", word):
        raise ValueError(
            f"not a LAMBADA passage: it ends in {text[-12:]!r}, not in a word to predict "
            "(WikiText's and corpora's {\"text\"} rows look like this)"
        )
    return [(context, " " + word)], 0, None


def read_lambada_pair(item, sep):
    context, cont = strings(item["context"], item["continuation"])
    # joined by one space, as llm-foundry and lm-eval do, whatever the continuation starts with
    # ("\n\nrecorder" too): the pair then equals OpenAI's {"text"} form of the passage
    if not (context.endswith(" ") or cont.startswith(" ")):
        cont = " " + cont  # llm-foundry's file: "... I don't care about" + "signs"
    return [(context, cont)], 0, None


# (kind, keys that identify the format, keys every line must have, reader), tried in this order
FORMATS = [
    ("winogrande", ("context_options",), ("context_options", "continuation", "gold"), read_schema),
    (
        "winogrande",
        ("sentence", "option1"),
        ("sentence", "option1", "option2", "answer"),
        read_winogrande,
    ),
    ("hellaswag", ("endings",), ("endings", "label"), read_hellaswag),
    (
        "siqa",
        ("answerA",),
        ("context", "question", "answerA", "answerB", "answerC", "label"),
        read_siqa,
    ),
    ("arc", ("answerKey",), ("question", "answerKey"), read_arc),
    ("piqa", ("goal", "sol1"), ("goal", "sol1", "sol2", "label"), read_piqa),
    ("mc", ("query",), ("query", "choices", "gold"), read_query_choices),
    ("lambada", ("continuation",), ("context", "continuation"), read_lambada_pair),
    ("wikitext", ("page",), ("page",), None),
    ("lambada", ("text",), ("text",), read_lambada_text),
]
CHOICE_KINDS = ("winogrande", "hellaswag", "siqa", "arc", "piqa", "mc")


def find_format(item):
    """The first entry of FORMATS whose identifying keys the object has, or None."""
    return next((f for f in FORMATS if all(k in item for k in f[1])), None)


def refused_format(item):
    """The name of a benchmark whose rows look like one of FORMATS (CommonsenseQA's keys are ARC's)
    but which is not implemented here, or None: such files are refused by name, never scored as
    the other benchmark."""
    q = item.get("question")
    if "question_concept" in item or isinstance(q, dict) and "question_concept" in q:
        return "CommonsenseQA"
    if "question_stem" in item or "fact1" in item or re.fullmatch(r"\d+-\d+", str(item.get("id"))):
        return "OpenBookQA"  # Hugging Face's form, or AI2's (ids like "7-980"; ARC's are named)
    if {"subject", "choices", "answer"} <= item.keys():
        return "MMLU"
    return None


def refusal(name):
    return f"{name}: not implemented here (refused rather than scored as another benchmark)"


# What each kind is scored as: lm-eval's task of the paper's benchmark, its requests built as
# lm-eval builds them (the module docstring)
LM_EVAL_TASKS = {
    "lambada": "lambada_openai",
    "wikitext": "wikitext",
    "hellaswag": "hellaswag",
    "siqa": "siqa",
    "arc": "arc_easy / arc_challenge",
    "piqa": "piqa",
    "winogrande": "winogrande",
}


def definition(kind, item):
    """What a file whose first object is `item` is scored as: "lm-eval TASK" where its rows become
    lm-eval's requests for one of the paper's benchmarks, "variant: ..." where the file is another
    benchmark's form or prompt, "as given: ..." for {"query", "choices", "gold"} files of no known
    origin."""
    if kind == "winogrande" and "context_options" in item:
        return "lm-eval winogrande, partial scoring (llm-foundry's file)"
    if kind == "lambada" and "continuation" in item:
        return "lm-eval lambada_openai (llm-foundry's file)"
    if kind in LM_EVAL_TASKS:
        return f"lm-eval {LM_EVAL_TASKS[kind]}"
    if kind == "text":
        return "rolling perplexity of the file as one document"
    q, choices = item.get("query", ""), item.get("choices") or []
    if all(isinstance(c, str) and re.fullmatch(r"[A-Z]", c) for c in choices):
        siqa = q.startswith("Context:") and "\nQuestion:" in q
        return "variant: " + (
            "llm-foundry's SIQA, 2 of the 3 answers listed in the query and scored by their letter "
            "(lm-eval's siqa scores the 3 answers' text)"
            if siqa
            else "lettered choices, scored by the letter, not by the answers' text"
        )
    if re.search(r", (because|therefore)$", q.rstrip()):
        return (
            "variant: llm-foundry's COPA prompt (\"premise, because\"; lm-eval's copa has no comma)"
        )
    if q.startswith("Question:") and not q.rstrip().endswith("Answer:"):  # read_query_choices
        return 'lm-eval arc / piqa prompt (llm-foundry\'s file, "\\nAnswer:" added)'
    return "as given: the file's query and choices (not checked against a benchmark's definition)"


def unknown_format(item):
    expected = "; ".join("{" + ", ".join(f[2]) + "}" for f in FORMATS)
    return (
        "unknown benchmark format (keys "
        f"{', '.join(sorted(item)) or 'none'}); expected one of: {expected}"
    )


def read_benchmark(path, kinds, sep=" ", max_examples=None):
    """(kind, items) of a JSONL benchmark whose kind is one of `kinds`; items: (pairs, gold,
    lengths)."""
    return read_items(path, kinds, sep, max_examples)[:2]


def read_items(path, kinds, sep=" ", max_examples=None):
    """read_benchmark's (kind, items) and the line number of each item, for errors found later."""
    rows = read_jsonl(path, max_examples)
    if name := refused_format(rows[0][1]):
        raise EvalError(f"{path}:{rows[0][0]}: {refusal(name)}")
    fmt = find_format(rows[0][1])
    if fmt is None:
        raise EvalError(f"{path}:{rows[0][0]}: {unknown_format(rows[0][1])}")
    kind, _, keys, reader = fmt
    if kind not in kinds:
        raise EvalError(f"{path}: a {kind} file, expected {' or '.join(kinds)}")
    items = []
    for lineno, item in rows:
        missing = [k for k in keys if k not in item]
        if missing:
            raise EvalError(f"{path}:{lineno}: missing key(s) {', '.join(map(repr, missing))}")
        if reader is None:
            if not isinstance(item["page"], str) or not item["page"].strip():
                raise EvalError(f"{path}:{lineno}: 'page' must be a non-empty string")
            items.append(item["page"])
            continue
        try:
            items.append(reader(item, sep))
        except (ValueError, TypeError, AttributeError) as e:
            raise EvalError(f"{path}:{lineno}: {e}") from None
    return kind, items, [lineno for lineno, _ in rows]
