"""Constrained decoding on the CPU: xgrammar vs llguidance vs outlines-core, per vocabulary and grammar.

For each library x vocabulary x workload, in a fresh process (so one library's caches and threads do not
touch another's, and a case that runs past --timeout is cut off and reported as such):

    prepare   tokenizer -> the library's vocabulary index        once per model, at server start
    compile   JSON schema / json_object -> grammar + matcher       once per request (cold: no cache)
    first     the first token mask                                 (llguidance compiles lazily here)
    mask      fill the [ceil(V/32)] int32 bitmask, per decode step  p50 / p99 over the document's tokens
    accept    advance the matcher by the sampled token, per step
    rollback  undo 4 accepted tokens (speculative decoding), then re-accept them

The decode steps follow one fixed document (DOCUMENT, valid under SCHEMA) tokenized by the vocabulary's own
tokenizer, so every library sees the same token sequence; each token is checked against the mask before it
is accepted (a token the library refuses fails the case). Vocabularies (no hub access needed):

    tiny      the bundled model's byte-level BPE (moe_engine/models/tiny-moe), 4096 ids
    llama32k  bench/llama_tokenizer.py's Llama-2-style byte-fallback BPE, 32000 ids
    bpe152k   a synthetic Qwen2-sized byte-level BPE built here: 151643 tokens + 205 specials, model vocab 151936

--coverage instead runs each JSON-schema feature in COVERAGE through each library with an instance the schema
allows and one it forbids: "enforced", "compiles, NOT enforced" (the forbidden one passes), or the refusal.

The engine uses llguidance (moe_engine/runtime/grammar.py), for these reasons:
  - Nothing accepted is ignored. On this coverage table llguidance enforces every keyword it accepts and
    refuses the rest by name (`not`, `uniqueItems`); xgrammar 0.2.9 compiles `allOf`, `uniqueItems` and `not`
    without enforcing them, and outlines-core lets integer bounds through: a 200 with output that breaks the
    schema, which the server must never return.
  - Compile cost per request. Schemas arrive with each request (response_format, every tool set); llguidance
    parses in milliseconds and builds its lexer lazily, where xgrammar precomputes a per-grammar token cache
    over the whole vocabulary (tens to hundreds of ms at 150k ids, more for many-tool anyOf schemas), and
    outlines-core builds a full regex DFA index (seconds even at 4k ids for json_object; no recursion, no CFG).
  - Mask time is far below a decode step either way: tens of microseconds per sequence at 150k ids for
    llguidance (xgrammar's is lower still), against milliseconds or more for an MoE forward on the CPU.
  - Rollback of n tokens (speculative verification) in both llguidance and xgrammar; outlines-core only
    within a max_rollback fixed when the guide is made.
  - Maintenance and weight: llguidance (guidance-ai) backs vLLM's "guidance" backend, SGLang and llama.cpp;
    one abi3 wheel with no Python dependencies. xgrammar pulls apache-tvm-ffi and triton.

    PYTHONPATH=. python bench/bench_grammar.py                          # all cases; appends to bench/RESULTS.md
    PYTHONPATH=. python bench/bench_grammar.py --coverage --no-record
    PYTHONPATH=. python bench/bench_grammar.py --smoke                  # 1 pass, 8 steps, tiny vocab: a check
"""
from __future__ import annotations

import argparse
import importlib
import json
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "moe_engine" / "models" / "tiny-moe"
LIBS = ("xgrammar", "llguidance", "outlines-core")
VOCABS = ("tiny", "llama32k", "bpe152k")
WORKLOADS = ("json_schema", "json_object")
ROLLBACK = 4

SCHEMA = {   # a purchase order: nested objects, arrays of objects, enums, bounds, formats, $defs/$ref, optionals
    "type": "object",
    "$defs": {"address": {"type": "object", "properties": {
        "street": {"type": "string"}, "city": {"type": "string"},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "enum": ["US", "DE", "FR", "JP"]}},
        "required": ["street", "city", "country"], "additionalProperties": False}},
    "properties": {
        "order_id": {"type": "integer", "minimum": 1},
        "created": {"type": "string", "format": "date-time"},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "email": {"type": "string", "format": "email"},
            "shipping": {"$ref": "#/$defs/address"}, "billing": {"$ref": "#/$defs/address"}},
            "required": ["name", "shipping"], "additionalProperties": False},
        "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
            "price": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}},
            "gift": {"type": "boolean"}},
            "required": ["sku", "quantity", "price"], "additionalProperties": False}},
        "status": {"type": "string", "enum": ["pending", "paid", "shipped", "cancelled"]},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["order_id", "customer", "items", "status"], "additionalProperties": False}

DOCUMENT = {
    "order_id": 48213, "created": "2024-05-17T09:41:00Z",
    "customer": {"name": "Ada Lovelace", "email": "ada@example.com",
                 "shipping": {"street": "12 Analytical Row", "city": "London", "zip": "10115", "country": "DE"}},
    "items": [{"sku": "BAB-0001", "quantity": 2, "price": 19.99, "tags": ["engine", "brass"], "gift": False},
              {"sku": "NOTE-G", "quantity": 1, "price": 4.5, "tags": []}],
    "status": "paid", "note": "Leave at the door, please."}

COVERAGE = {   # feature: (schema, an instance it allows, one it forbids); features tool parameters commonly use
    "enum/const": ({"type": "object", "properties": {"a": {"enum": ["x", 1]}, "b": {"const": "k"}}},
                   {"a": 1, "b": "k"}, {"a": 2}),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "s", 1.5),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "s"),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
              {"a": 1, "b": "x"}, {"a": 1}),
    "$ref recursion": ({"$defs": {"n": {"type": "object", "properties": {"k": {"type": "array",
                        "items": {"$ref": "#/$defs/n"}}}, "additionalProperties": False}}, "$ref": "#/$defs/n"},
                       {"k": [{"k": [{}]}]}, {"k": [{"j": 1}]}),
    "string bounds": ({"type": "string", "minLength": 2, "maxLength": 5}, "abc", "abcdef"),
    "pattern": ({"type": "string", "pattern": "^[a-z]+-[0-9]{2,4}$"}, "ab-123", "ab-1"),
    "format date-time": ({"type": "string", "format": "date-time"}, "2024-05-17T09:41:00Z", "yesterday"),
    "format email": ({"type": "string", "format": "email"}, "a@b.com", "a.b.com"),
    "number bounds": ({"type": "number", "minimum": -1.5, "exclusiveMaximum": 10}, 9.5, 10),
    "integer bounds": ({"type": "integer", "minimum": 3, "maximum": 300}, 42, 301),
    "array bounds": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2], [1]),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    [1, "a"], [1, 2]),
    "additionalProperties schema": ({"type": "object", "additionalProperties": {"type": "integer"}},
                                    {"q": 1}, {"q": "s"}),
    "additionalProperties false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                    "additionalProperties": False}, {"a": 1}, {"a": 1, "z": 2}),
    "patternProperties": ({"type": "object", "patternProperties": {"^x-": {"type": "string"}},
                           "additionalProperties": False}, {"x-a": "s"}, {"y": "s"}),
    "type list": ({"type": ["string", "null"]}, None, 3),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "not": ({"not": {"type": "string"}}, 1, "s"),
}


# ---- vocabularies ------------------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable-character table (byte-level BPE vocabularies spell bytes this way)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _pseudo_words(rng: random.Random, count: int) -> list[str]:
    """English-looking words (syllables of consonant clusters and vowels), each once."""
    onsets = ["", *"bcdfghjklmnprstvwz", "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gr", "pl", "pr", "sh",
              "sl", "sp", "st", "str", "th", "tr", "wh"]
    codas = ["", "", *"lmnrst", "ck", "ng", "nd", "nt", "rd", "rs", "st", "ll", "ss", "ght", "tion", "ing", "ed", "er"]
    words: dict[str, None] = {}
    while len(words) < count:
        w = "".join(rng.choice(onsets) + rng.choice("aeiouy" if rng.random() < 0.9 else ["ea", "ou", "io", "ee"])
                    + rng.choice(codas) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4))))
        words[w.capitalize() if rng.random() < 0.15 else w] = None
    return list(words)


def write_synthetic_bpe(out: Path, n_regular: int = 151_643, n_special: int = 205, seed: int = 0) -> None:
    """A byte-level BPE tokenizer of Qwen2's size: bytes, punctuation/digit runs, whitespace runs, word
    pieces with and without a leading space (every prefix of a word is a token, so merges chain), specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    bc = _byte_chars()
    vocab: dict[str, int] = {c: i for i, c in enumerate(bc)}
    merges: list[tuple[str, str]] = []

    def add_chain(word: str) -> None:   # every prefix as a token, each made by one merge
        for k in range(2, len(word) + 1):
            if len(vocab) >= n_regular:
                return
            if word[:k] not in vocab:
                vocab[word[:k]] = len(vocab)
                merges.append((word[:k - 1], word[k - 1]))

    sp, nl = bc[ord(" ")], bc[ord("\n")]
    for k in range(1, 16):
        add_chain(sp * (k + 1))
        add_chain(nl + sp * k)
    punct = string.punctuation + string.digits
    for a in punct:
        for b in punct:
            add_chain(a + b)
    rng = random.Random(seed)
    for w in _pseudo_words(rng, n_regular):
        add_chain(sp + w if rng.random() < 0.6 else w)
        if len(vocab) >= n_regular:
            break
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(n_special - 3)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def prepare_vocabs(names, workdir: Path) -> None:
    """Write the tokenizers the cases load (once; the child processes only read them)."""
    if "llama32k" in names and not (workdir / "llama32k" / "tokenizer.json").exists():
        (workdir / "llama32k").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "llama_tokenizer.py"), str(workdir / "llama32k")],
                       check=True, stdout=subprocess.DEVNULL)
    if "bpe152k" in names and not (workdir / "bpe152k" / "tokenizer.json").exists():
        write_synthetic_bpe(workdir / "bpe152k")


def load_vocab(name: str, workdir: Path):
    """(HF tokenizer, model vocab size, eos id) for a vocabulary name."""
    from transformers import AutoTokenizer
    path = {"tiny": TINY}.get(name, workdir / name)
    tok = AutoTokenizer.from_pretrained(str(path))
    model_vocab = {"tiny": 4096, "llama32k": 32000, "bpe152k": 151_936}[name]
    return tok, model_vocab, tok.eos_token_id


def token_bytes(tok) -> dict[bytes, list[int]]:
    """Each non-special token's bytes (byte-level or byte-fallback spelling undone), for outlines-core."""
    inverse = {c: b for b, c in enumerate(_byte_chars())}
    special = set(tok.all_special_ids)
    byte_level = all(c in inverse for c in "".join(list(tok.get_vocab())[:2000]))
    out: dict[bytes, list[int]] = {}
    for piece, i in tok.get_vocab().items():
        if i in special:
            continue
        if byte_level and all(c in inverse for c in piece):
            raw = bytes(inverse[c] for c in piece)
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            raw = bytes([int(piece[3:5], 16)])
        else:
            raw = piece.replace("\u2581", " ").encode()
        out.setdefault(raw, []).append(i)
    return out


# ---- one library behind four calls -------------------------------------------------------------------------
class XGrammar:
    def __init__(self, tok, vocab, eos, threads):
        import xgrammar as xgr
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        cg = (self.compiler.compile_builtin_json_grammar() if schema is None
              else self.compiler.compile_json_schema(json.dumps(schema)))
        return self.xgr.GrammarMatcher(cg)

    def fill(self, m):
        m.fill_next_token_bitmask(self.bitmask)

    def accept(self, m, t):
        return m.accept_token(t)

    def rollback(self, m, n):
        m.rollback(n)


class LLGuidance:
    def __init__(self, tok, vocab, eos, threads):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.ll, self.llt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"})
        m = self.ll.LLMatcher(self.tok, grammar)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def fill(self, m):
        self.llt.fill_next_token_bitmask(m, self.bitmask, 0)

    def accept(self, m, t):
        return m.consume_token(t)

    def rollback(self, m, n):
        m.rollback(n)


class OutlinesCore:
    def __init__(self, tok, vocab, eos, threads):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        self.oc, self.regex_of = outlines_core, build_regex_from_schema
        self.vocab, self.eos = outlines_core.Vocabulary(eos, token_bytes(tok)), eos
        self.bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def compile(self, schema):   # regex only: json_object is a JSON object regex of bounded nesting
        regex = self.regex_of(json.dumps(schema if schema is not None else {"type": "object"}))
        return self.oc.Guide(self.oc.Index(regex, self.vocab), max_rollback=ROLLBACK)

    def fill(self, m):
        m.write_mask_into(self.bitmask.data_ptr(), self.bitmask.numel(), self.bitmask.element_size())

    def accept(self, m, t):   # a Guide in a final state allows eos but cannot advance by it
        if t != self.eos:
            m.advance(t, return_tokens=False)
        return True

    def rollback(self, m, n):
        m.rollback_state(n)


BACKENDS = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines-core": OutlinesCore}
MODULES = {"xgrammar": ["xgrammar"], "llguidance": ["llguidance", "llguidance.hf", "llguidance.torch"],
           "outlines-core": ["outlines_core", "outlines_core.json_schema"]}


def allowed(bitmask: torch.Tensor, t: int) -> bool:
    return bool((bitmask.view(-1)[t // 32].item() >> (t % 32)) & 1)


def run_case(lib: str, vocab_name: str, workload: str, workdir: Path, repeats: int, max_steps: int,
             threads: int) -> dict:
    """Time one library on one vocabulary and workload; returns the row's numbers (milliseconds, microseconds)."""
    tok, vocab, eos = load_vocab(vocab_name, workdir)
    ids = tok.encode(json.dumps(DOCUMENT), add_special_tokens=False) + [eos]
    ids = ids[:max_steps]   # a cut-off document has no eos step (it cannot end there)
    for name in MODULES[lib]:   # import time is not part of "prepare"
        importlib.import_module(name)
    t0 = time.perf_counter()
    be = BACKENDS[lib](tok, vocab, eos, threads)
    prepare = time.perf_counter() - t0
    schema = SCHEMA if workload == "json_schema" else None
    compile_s, first, masks, accepts, rollbacks = [], [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = be.compile(schema)
        compile_s.append(time.perf_counter() - t0)
        for step, t in enumerate(ids):
            t0 = time.perf_counter()
            be.fill(m)
            (first if step == 0 else masks).append(time.perf_counter() - t0)
            if not allowed(be.bitmask, t):
                raise RuntimeError(f"{lib} refused token {t} ({tok.decode([t])!r}) at step {step}")
            t0 = time.perf_counter()
            ok = be.accept(m, t)
            accepts.append(time.perf_counter() - t0)
            if ok is False:
                raise RuntimeError(f"{lib} did not accept token {t} at step {step}")
            if step % 8 == 7 and t != eos:
                t0 = time.perf_counter()
                be.rollback(m, ROLLBACK)
                rollbacks.append(time.perf_counter() - t0)
                for u in ids[step - ROLLBACK + 1:step + 1]:
                    be.accept(m, u)
    q = statistics.quantiles(masks, n=100) if len(masks) > 1 else masks * 99
    return {"vocab_size": vocab, "steps": len(ids), "prepare_ms": prepare * 1e3,
            "compile_ms": statistics.median(compile_s) * 1e3, "first_mask_ms": statistics.median(first) * 1e3,
            "mask_p50_us": statistics.median(masks) * 1e6 if masks else float("nan"),
            "mask_p99_us": q[98] * 1e6 if masks else float("nan"),
            "accept_us": statistics.median(accepts) * 1e6,
            "rollback_us": statistics.median(rollbacks) * 1e6 if rollbacks else float("nan")}


def follows(be, m, ids: list[int]) -> bool:
    """Whether the matcher allows every token of ids in turn."""
    for t in ids:
        be.fill(m)
        if not allowed(be.bitmask, t) or be.accept(m, t) is False:
            return False
    return True


def enforcement(be, tok, eos, schema, good, bad) -> str:
    """'enforced', 'compiles, not enforced' (the forbidden instance passes), or the library's refusal."""
    try:
        results = []
        for instance in (good, bad):
            m = be.compile(schema)
            results.append(follows(be, m, tok.encode(json.dumps(instance), add_special_tokens=False) + [eos]))
    except Exception as e:  # noqa: BLE001 - the library's own refusal is the result
        return "refused: " + str(e).splitlines()[0][:48].replace("|", "/")
    return {(True, False): "enforced", (True, True): "compiles, NOT enforced"}.get(tuple(results), "rejects valid")


def run_coverage(workdir: Path) -> str:
    """Which JSON-schema features each library enforces (tiny vocabulary); a markdown table."""
    tok, vocab, eos = load_vocab("tiny", workdir)
    backends = {lib: BACKENDS[lib](tok, vocab, eos, 1) for lib in LIBS}
    rows = ["| feature | " + " | ".join(LIBS) + " |", "|---" * (len(LIBS) + 1) + "|"]
    for name, (schema, good, bad) in COVERAGE.items():
        cells = [enforcement(be, tok, eos, schema, good, bad) for be in backends.values()]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def child(args) -> None:
    try:
        row = run_case(args.one[0], args.one[1], args.one[2], Path(args.workdir), args.repeats, args.max_steps,
                       args.threads)
    except Exception as e:  # noqa: BLE001 - reported in the table as the case's result
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
    print("RESULT " + json.dumps(row))


def fmt(row: dict) -> list[str]:
    if "error" in row:
        return [row["error"]] + [""] * 7
    return [str(row["steps"]), f"{row['prepare_ms']:.0f}", f"{row['compile_ms']:.1f}", f"{row['first_mask_ms']:.2f}",
            f"{row['mask_p50_us']:.0f}", f"{row['mask_p99_us']:.0f}", f"{row['accept_us']:.0f}",
            f"{row['rollback_us']:.0f}"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    ap.add_argument("--vocabs", nargs="+", default=list(VOCABS), choices=VOCABS)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--repeats", type=int, default=5, help="passes over the document per case (compile each time)")
    ap.add_argument("--max-steps", type=int, default=10_000, help="decode steps per pass (the document's tokens)")
    ap.add_argument("--threads", type=int, default=1, help="xgrammar's compile threads (the others use one)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per case before it is reported as cut off")
    ap.add_argument("--workdir", default=None, help="where the built tokenizers are kept (default: a temp dir)")
    ap.add_argument("--coverage", action="store_true", help="print the JSON-schema feature table instead")
    ap.add_argument("--smoke", action="store_true", help="1 pass of 8 steps on the tiny vocabulary (a check)")
    ap.add_argument("--one", nargs=3, metavar=("LIB", "VOCAB", "WORKLOAD"), help=argparse.SUPPRESS)
    add_record_flag(ap)
    args = ap.parse_args(argv)
    if args.one:
        return child(args)
    if args.smoke:
        args.vocabs, args.repeats, args.max_steps = ["tiny"], 1, 8
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_grammar_"))
    if args.coverage:
        table = run_coverage(workdir)
        print(table)
        if wants_record(args):
            record("JSON-schema coverage: xgrammar, llguidance, outlines-core", table)
        return
    prepare_vocabs(args.vocabs, workdir)
    head = ["library", "vocab", "workload", "steps", "prepare ms", "compile ms", "first mask ms", "mask p50 us",
            "mask p99 us", "accept us", f"rollback({ROLLBACK}) us"]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for vocab in args.vocabs:
        for workload in args.workloads:
            for lib in args.libs:
                cmd = [sys.executable, __file__, "--one", lib, vocab, workload, "--workdir", str(workdir),
                       "--repeats", str(args.repeats), "--max-steps", str(args.max_steps),
                       "--threads", str(args.threads)]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout).stdout
                    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
                    row = json.loads(line[-1][7:]) if line else {"error": "no result (crashed)"}
                except subprocess.TimeoutExpired:
                    row = {"error": f"cut off after {args.timeout:.0f} s"}
                size = row.get("vocab_size", "")
                rows.append("| " + " | ".join([lib, f"{vocab} {size}", workload, *fmt(row)]) + " |")
                print(rows[-1], flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    if wants_record(args):
        record("Grammar-constrained decoding: compile and per-step mask time on the CPU", table,
               notes=f"--threads {args.threads} (xgrammar compile threads); mask/accept/rollback are one matcher, "
                     "one thread. Each case runs in its own process.")


if __name__ == "__main__":
    main()
