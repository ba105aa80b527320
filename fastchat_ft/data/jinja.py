"""template="tokenizer": the model's own Jinja chat_template, rendered by transformers' renderer (so the text
is exactly apply_chat_template's), with exact assistant masks.

Masks: a template with {% generation %} tags gives its spans directly (equal to HF's
return_assistant_tokens_mask). Without tags, each trainable assistant turn i is found by prefix diffing:
render(messages[:i], add_generation_prompt=True) is a prefix of render(messages[:i+1]), itself a prefix of
the whole render; the turn is what lies between, trailing whitespace dropped. So what the generation prompt
supplies (headers, an empty <think></think>) is never trained, and the end-of-turn token is. When a
template rewrites history (the prefixes do not line up) the turn's content is located in the full text and
the conversation is counted as inexact.
"""
from __future__ import annotations

import json
import re

import numpy as np

from fastchat_ft import _native
from fastchat_ft.errors import DataError
from fastchat_ft.data.encode import LoaderStats, ChatOptions, finalize, self_check
from fastchat_ft.data.tokenize import LoaderTokenizer

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function": "tool"}
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def normalize_record(record: dict) -> tuple[list[dict], list | None]:
    """OpenAI or ShareGPT record -> (messages with string content, tools); already validated natively."""
    if "messages" in record:
        msgs = []
        for m in record["messages"]:
            m = dict(m)
            if isinstance(m.get("content"), list):
                m["content"] = "".join(p if isinstance(p, str) else p.get("text", p.get("value", ""))
                                       for p in m["content"])
            msgs.append(m)
    else:
        msgs = [{"role": SHAREGPT_ROLES[t.get("from", t.get("role"))], "content": t.get("value", t.get("content")),
                 **({"weight": t["weight"]} if "weight" in t else {})} for t in record["conversations"]]
        if record.get("system"):  # ShareGPT's prompt beside the turns: the first turn, as the native reader does
            msgs.insert(0, {"role": "system", "content": record["system"]})
    return msgs, record.get("tools") or None


class JinjaRenderer:
    def __init__(self, tok: LoaderTokenizer, opts: ChatOptions):
        if not tok.chat_template:
            raise DataError("template='tokenizer' but the tokenizer has no chat_template",
                            fix="put chat_template.jinja (or chat_template in tokenizer_config.json) next to "
                                "tokenizer.json, or use a built-in template")
        from transformers.utils.chat_template_utils import render_jinja_template
        self._render = render_jinja_template
        self.tok, self.opts = tok, opts
        self.template = tok.chat_template
        self.tagged = bool(GENERATION_TAG.search(self.template))
        self.special = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
        specials = sorted(_special_tokens(tok), key=len, reverse=True)
        self.special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def render(self, messages, tools=None, add_generation_prompt=False, spans=False):
        texts, gen = self._render(conversations=[messages], tools=tools, chat_template=self.template,
                                  return_assistant_tokens_mask=spans, add_generation_prompt=add_generation_prompt,
                                  **self.special)
        return (texts[0], gen[0]) if spans else texts[0]

    def trains(self, messages, i) -> bool:
        m = messages[i]
        if m.get("weight", m.get("loss_weight", 1)) in (0, False):
            return False
        if self.opts.train_on == "all":
            return True
        if m["role"] != "assistant":
            return False
        if self.opts.train_on == "last_assistant":
            return i == max(k for k, x in enumerate(messages) if x["role"] == "assistant")
        return True

    def spans(self, messages, tools):
        """(text, [(char_begin, char_end, message)], turn char ends, inexact)."""
        if self.tagged:
            text, gen = self.render(messages, tools, spans=True)
            return text, [(a, b, -1) for a, b in gen], [b for _, b in gen], False
        text = self.render(messages, tools)
        spans, ends, inexact, cursor = [], [], False, 0
        for i, m in enumerate(messages):
            if not self.trains(messages, i):
                continue
            prompt = self.render(messages[:i], tools, add_generation_prompt=True) if i else ""
            upto = self.render(messages[:i + 1], tools)
            body = upto[len(prompt):].rstrip()
            if upto.startswith(prompt) and text.startswith(upto) and body:
                spans.append((len(prompt), len(prompt) + len(body), i))
                ends.append(len(upto))
                cursor = len(upto)
                continue
            # The template renders history differently from the last turn: find the content itself.
            content = str(m.get("content") or "").strip()
            at = text.find(content, cursor) if content else -1
            if at < 0 and "</think>" in content:  # the template dropped this turn's reasoning from history
                content = content.split("</think>")[-1].strip()
                at = text.find(content, cursor) if content else -1
            if at < 0:
                raise DataError(f"cannot locate assistant turn {i} in the rendered chat template",
                                field=f"messages[{i}]", fix="use a built-in template for this model")
            end = at + len(content)
            eot = self.special_re.match(text, end) if self.special_re else None
            if eot:
                end = eot.end()
            spans.append((at, end, i))
            ends.append(end)
            cursor = end
            inexact = True
        return text, spans, ends, inexact

    def controls(self, text: str, messages) -> list[tuple[int, int]]:
        """Char spans of special tokens the template wrote (those inside message content are text)."""
        if self.special_re is None:
            return []
        found = [(m.start(), m.end()) for m in self.special_re.finditer(text)]
        if self.opts.allow_special_in_content:
            return found
        content_ranges, cursor = [], 0
        for m in messages:
            c = m.get("content")
            if isinstance(c, str) and c and self.special_re.search(c):
                at = text.find(c, cursor)
                if at >= 0:
                    content_ranges.append((at, at + len(c)))
                    cursor = at + len(c)
        return [s for s in found if not any(a <= s[0] and s[1] <= b for a, b in content_ranges)]

    def encode(self, record: dict):
        """record -> (ids, labels, turn_token_ends, flags, text, byte spans)."""
        messages, tools = normalize_record(record)
        try:
            text, spans, turn_ends, inexact = self.spans(messages, tools)
        except DataError:
            raise
        except Exception as e:  # the template raised (roles, unsupported fields): the user's data or template
            raise DataError(f"the model's chat template refused this conversation: {e}",
                            fix="fix the conversation (the template's message says how) or use a built-in template")
        raw = text.encode("utf-8")
        cum = _char_to_byte_table(text, raw)
        controls = [(cum[a], cum[b]) for a, b in self.controls(text, messages)]
        byte_spans = np.asarray([(cum[a], cum[b], i) for a, b, i in spans], dtype=np.int32).reshape(-1, 3)
        if self.tok.native is not None:
            ids, starts, ends = self.tok.native.encode_with_offsets(text, self.opts.allow_special_in_content, False,
                                                                   controls)
        else:
            ((ids, starts, ends),) = self.tok.encode_rendered_hf(
                [text], [np.asarray(controls, dtype=np.uint32).reshape(-1, 2)], self.opts.allow_special_in_content)
        labels, flags = _native.label_tokens(ids, starts, ends, byte_spans)
        tte = _native.turn_token_ends(ends, np.asarray([cum[e] for e in turn_ends], dtype=np.uint32))
        return ids, labels, tte, int(flags) | (1 if inexact else 0), text, byte_spans


def _special_tokens(tok: LoaderTokenizer) -> list[str]:
    if tok.hf is not None:
        return [t.content for t in tok.hf.get_added_tokens_decoder().values() if t.special]
    n = tok.native.vocab_size
    n = n() if callable(n) else n
    return [tok.native.id_to_token(i) for i in range(n) if tok.native.is_special(i)]


def _char_to_byte_table(text: str, raw: bytes):
    if len(raw) == len(text):
        return list(range(len(text) + 1))
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    sizes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(sizes)]).tolist()


def encode_with_chat_template(record: dict, tok: LoaderTokenizer, opts: ChatOptions):
    ids, labels, _, _, _, _ = JinjaRenderer(tok, opts).encode(record)
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


class JinjaBatchEncoder:
    """ChatDataset's Jinja path: batches come from the native reader (validated records as JSON)."""

    def __init__(self, tok: LoaderTokenizer, opts: ChatOptions):
        self.renderer = JinjaRenderer(tok, opts)
        self.tok, self.opts = tok, opts

    def process(self, batch: dict, stats: LoaderStats, budget: int, file: str, on_error: str, reject,
                kept_lines: list | None = None):
        kept = []
        for i in np.flatnonzero(batch["ok"]):
            record = json.loads(batch["records"][i])
            try:
                ids, labels, tte, flags, text, spans = self.renderer.encode(record)
            except DataError as e:
                e = DataError(e.reason, file=file, line=int(batch["lines"][i]), field=e.field, fix=e.fix)
                if on_error == "raise":
                    raise e from None
                reject(int(batch["lines"][i]), e, batch["records"][i])  # counts it in stats too
                continue
            stats.records += 1
            if budget > 0 and not flags & 1:
                budget -= 1
                stats.self_checked += 1
                problem = self_check(ids, labels, text, spans, self.tok)
                if problem:
                    stats.self_check_failed += 1
                    if len(stats.examples) < 10:
                        stats.examples.append(f"line {int(batch['lines'][i])}: {problem}")
            result = finalize(ids, labels, tte, flags, self.opts, stats)
            if result is None:
                continue
            stats.conversations += 1
            stats.tokens += len(result[0])
            stats.trainable_tokens += int((result[1] != -100).sum())
            kept.append(result)
            if kept_lines is not None:
                kept_lines.append(int(batch["lines"][i]))
        return kept, budget
