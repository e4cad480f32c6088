"""``OnnxPipeline``: load a bundle, check it against its manifest, classify text like a Hugging Face
text-classification pipeline, with onnxruntime, tokenizers and numpy only.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cascade as _cascade
from . import manifest as _manifest
from . import trust as _trust
from .cpu import warn_target_once
from .manifest import BundleError
from .scores import read_answer, softmax, thresholded, top_of_list, top_of_row  # noqa: F401  (softmax, thresholded: re-exported)
from .session import (
    answer_output,
    check_runtime,
    check_values,
    effective_settings,
    make_session,
    warn_ort_once,
)
from .wordpiece import FastWordPiece

if TYPE_CHECKING:
    import numpy as np

# numpy is imported where arrays are made, not here: a process serving a bundle through the C API
# session (runtime_shim.capi) answers single texts and batches without loading it (docs/memory.md).
ORT_INT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32"}  # an input's numpy dtype name
BEST = "best"  # top_k's default: one dict per text, as transformers' default (its top_k=None: every label)


def _read_json(path: Path, **kwargs: Any) -> dict[str, Any]:
    data = _manifest.read_json(path, "re-run `edgepack pack` or restore the file", **kwargs)
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object; re-run `edgepack pack` or restore the file")
    return data


class OnnxPipeline:
    """A bundle loaded for inference: ``pipe("text") -> [{"label", "score"}]``.

    Loading verifies every file against ``manifest.json`` (``verify=False`` skips it) and builds the
    ONNX Runtime session from ``runtime.json``. With trusted keys (``trusted_keys=DIR`` or
    ``EDGEPACK_TRUSTED_KEYS``; ``trusted_keys=False`` ignores that variable) it also requires a signature by one of them, no unlisted file and a
    version not older than the last one accepted (``allow_downgrade=True`` to go back on purpose):
    ``runtime_shim.trust.verify_bundle``, whose result is kept as ``trust``; ``overrides`` replaces settings of ``runtime.json``
    (``{"intra_op_num_threads": 2}``) without editing the bundle. The thread settings ``tune`` kept on this
    device for this bundle (``runtime_shim.tuned``) apply under ``overrides``; ``device_settings=False`` ignores them.

    The out-of-scope threshold (``labels.json``) is applied by default: when the top softmax
    probability is below ``oos_threshold`` the answer is ``oos_label``, and its score stays that top
    probability (how sure the model was of its best in-scope guess, so a low score reads as "unsure").

    Texts the WordPiece fast path covers (``runtime_shim.wordpiece``: printable ASCII, for a BERT
    tokenizer) are tokenized without ``tokenizers``, which is imported and loaded the first time a text
    needs it (a file it then refuses raises ``BundleError`` there): ~12 MB less peak memory on such
    traffic (docs/memory.md).

    Scores of a text can differ in the third decimal between calls with different batch-mates: dynamic
    int8 quantization scales activations over the whole batch (padding included).

    On Linux the session is made through ONNX Runtime's C API (``runtime_shim.capi``, the installed wheel's
    own C library; ``session_api`` in ``runtime.json`` or ``overrides`` chooses): single texts and lists
    (with the default ``top_k``) are then answered without importing numpy or the ``onnxruntime`` package, 14-15 MB
    less peak memory (docs/memory.md); ``encode``, ``forward`` and ``predict`` still speak numpy.

    A cascade bundle (``runtime.json`` ``cascade``, ``runtime_shim.cascade``) answers a text whose top
    probability is under ``escalate_below`` with its ``fallback`` pipeline, on every path above.

    Loading a bundle on a CPU that lacks its target's flags issues one ``runtime_shim.cpu.CpuTargetWarning``
    per process (ONNX Runtime then runs other int8 kernels, and answers may differ from the build's); on an
    onnxruntime older than the one its manifest names, one ``runtime_shim.session.OrtVersionWarning``.

    Examples:
        >>> pipe = OnnxPipeline("bundle")  # doctest: +SKIP
        >>> pipe("what is my checking balance")  # doctest: +SKIP
        [{'label': 'balance', 'score': 0.97}]
        >>> pipe(["wake me at 7", "who won the game"], top_k=2)  # doctest: +SKIP
        [[{'label': 'alarm', 'score': 0.91}, ...], [{'label': 'oos', 'score': 0.41}, ...]]
    """

    def __init__(self, bundle_dir: str | os.PathLike, *, verify: bool = True,
                 overrides: Mapping[str, Any] | None = None, trusted_keys: str | os.PathLike | bool | None = None,
                 allow_downgrade: bool = False, device_settings: bool = True):
        root = Path(bundle_dir)
        if not root.is_dir():
            raise BundleError(f"{root}: no such bundle directory; pass the directory `edgepack pack` wrote")
        self.bundle_dir = root
        self.trust: _trust.Verified | None = None
        if verify:
            self.trust = _trust.verify_bundle(root, keys=trusted_keys, allow_downgrade=allow_downgrade)
            self.manifest = self.trust.manifest
        else:
            self.manifest = _manifest.read_manifest(root) if os.path.lexists(root / _manifest.MANIFEST) else {}
        runtime = _read_json(root / "runtime.json")
        labels = _read_json(root / "labels.json")
        self.overrides = dict(overrides or {})
        # Files named by runtime.json must be the bundle's own; ``overrides`` are the caller's (the build
        # compares an fp32 model outside the bundle), its numbers checked as the file's are.
        listed = self.manifest.get("files") if self.manifest else None
        check_runtime(root / "runtime.json", runtime, listed)
        check_values("overrides", self.overrides)
        # This device's own settings for this bundle (what `tune` kept here, beside the release, keyed by
        # the manifest's sha256: ``runtime_shim.tuned``) go between runtime.json and the caller's overrides.
        self.tuned: dict[str, Any] | None = None
        if device_settings and self.manifest:
            from . import tuned as _tuned

            self.tuned = _tuned.read_tuned(_tuned.manifest_digest(root))
        self.settings: dict[str, Any] = effective_settings(effective_settings(runtime, self.tuned), self.overrides)

        names = labels.get("labels")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise BundleError(f"{root / 'labels.json'}: 'labels' must be a non-empty list of label names "
                              "(index = id); re-run `edgepack pack`")
        self.label_names: list[str] = list(names)
        self.oos_label: str | None = labels.get("oos_label")
        if self.oos_label is not None and self.oos_label not in self.label_names:
            raise BundleError(f"{root / 'labels.json'}: oos_label {self.oos_label!r} is not among the labels; "
                              "fix it or set it to null")
        threshold = labels.get("oos_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 <= threshold <= 1.0):
            raise BundleError(f"{root / 'labels.json'}: oos_threshold {str(threshold)[:40]} is not a probability; "
                              "set a number in [0, 1] or null")
        self.oos_threshold: float | None = None if threshold is None or self.oos_label is None else float(threshold)
        self.oos_id: int | None = None if self.oos_label is None else self.label_names.index(self.oos_label)

        self.max_length: int = self.settings.get("max_length", 128)
        self.pad_id: int = self.settings.get("pad_id", 0)
        self.tokenizer_path = root / str(self.settings.get("tokenizer", "tokenizer.json"))
        self._tokenizer_file = self.tokenizer_path.resolve()
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        # Texts' ids without the tokenizers call where that is exact (runtime_shim.wordpiece), built from
        # the file itself: `tokenizers` is then imported and the file loaded into it only when a text
        # needs it (not plain ASCII, or holding a special token), which saves ~12 MB of peak memory on
        # ASCII traffic (docs/memory.md). runtime.json or overrides {"fast_wordpiece": false} turn it off.
        self.fast_wordpiece: FastWordPiece | None = None
        if self.settings.get("fast_wordpiece", True):
            # Parsed here for the fast path only (tokenizers parses the file itself when a text needs it).
            self.fast_wordpiece = FastWordPiece.from_json(_read_json(self.tokenizer_path, unique=False, depth=None),
                                                          self.max_length)
        if self.fast_wordpiece is None:
            self._load_tokenizer()  # needed for every text: load it now, so a bad file fails the load

        self.model_path = root / str(self.settings.get("model", "model.quant.onnx"))
        self.session = make_session(self.model_path, self.settings)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._input_types = {i.name: ORT_INT_TYPES.get(i.type, "int64") for i in self.session.get_inputs()}
        self._rows: dict[tuple[str, int], np.ndarray] = {}
        # A C API session feeds token id rows itself (runtime_shim.capi): the calls below then need no numpy.
        self._run_rows = getattr(self.session, "run_rows", None)
        known = {"input_ids", "attention_mask", "token_type_ids"}
        unknown = [n for n in self.input_names if n not in known]
        if unknown:
            raise BundleError(f"{self.model_path}: expects inputs {unknown} besides input_ids/attention_mask/"
                              "token_type_ids; this is not a text classifier edgepack packed")
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.output_name = "logits" if "logits" in outputs else next(iter(outputs))
        out = outputs[self.output_name]
        width = (out.shape or [None])[-1]
        if out.type != "tensor(float)" or len(out.shape or ()) != 2 or width != len(self.label_names):
            # Both sessions refuse a run whose logits differ from this declaration (the C API one asks ORT
            # for each run's shape), so the width checked here is the width every answer has.
            raise BundleError(f"{self.model_path}: declares {self.output_name!r} as {out.type} {out.shape}, but "
                              f"labels.json names {len(self.label_names)} labels: expected tensor(float) "
                              f"[batch, {len(self.label_names)}]; re-run `edgepack pack`")

        # The answer inside the graph (session.answer_output): an output of the bundle's model, not an override's.
        answer = self.settings.get("answer") if "answer" in self.overrides or "model" not in self.overrides else None
        self.answer_name = answer_output(root / "runtime.json", self.model_path, outputs, answer)
        self._run_one = getattr(self.session, "run_one", None) if self.answer_name is not None else None

        # Once per process: checked on its target's int8 kernels and its onnxruntime, not this CPU's or an older one.
        warn_target_once(self.manifest)
        warn_ort_once(self.manifest, self.session)

        self.model_bytes: int = self.model_path.stat().st_size
        self.bundle_bytes: int = _manifest.bundle_bytes(root)
        self.name: str = str(self.manifest.get("name") or root.resolve().name)

        # A cascade (runtime.json "cascade"): texts this model is less sure of than ``escalate_below``
        # are answered by the fallback bundle inside this one, under the fallback's out-of-scope threshold.
        self.fallback: OnnxPipeline | None = None
        self.escalate_below: float | None = None
        if self.settings.get("cascade") is not None:
            self._load_fallback(self.settings["cascade"])

    def _load_fallback(self, setting: Any) -> None:
        """The cascade's second model (``runtime_shim.cascade``: the setting, the rule, its checks)."""
        sub, below = _cascade.read_setting(self.bundle_dir, setting)
        fallback = OnnxPipeline(sub, verify=False, overrides={k: v for k, v in self.overrides.items() if k != "cascade"})
        _cascade.check_pair(self.bundle_dir, self, fallback, below)
        self.fallback, self.escalate_below = fallback, below
        self.oos_threshold = fallback.oos_threshold  # the cascade answers under the fallback's threshold
        self.model_bytes += fallback.model_bytes

    @property
    def tokenizer(self):
        """The bundle's ``tokenizers.Tokenizer``, truncating to ``max_length`` and padding to the longest
        text; loaded on first use when the WordPiece fast path covers the texts so far.

        Examples:
            >>> type(OnnxPipeline("bundle").tokenizer).__name__  # doctest: +SKIP
            'Tokenizer'
        """
        return self._tokenizer if self._tokenizer is not None else self._load_tokenizer()

    def _load_tokenizer(self):
        with self._tokenizer_lock:
            if self._tokenizer is not None:
                return self._tokenizer
            from tokenizers import Tokenizer

            path = self.tokenizer_path
            _manifest.regular_size(self._tokenizer_file, _manifest.JSON_LIMITS["tokenizer.json"],
                                   "re-run `edgepack pack` or restore the file")
            try:
                # The absolute path taken at load: a caller may change directory before the first text
                # that needs the tokenizer (the static-QDQ quantizer calibrates inside a scratch directory).
                tok = Tokenizer.from_file(str(self._tokenizer_file))
            except Exception as e:  # tokenizers raises a bare Exception for a malformed file
                raise BundleError(f"{path}: not a `tokenizers` file ({str(e)[:200]}); re-run `edgepack pack`") from None
            # Whatever padding/truncation the saved tokenizer carried, the bundle's settings rule: truncate to
            # the length the model was exported and calibrated for, pad only to the longest in the batch.
            tok.enable_truncation(max_length=self.max_length)
            tok.enable_padding(pad_id=self.pad_id, pad_token=tok.id_to_token(self.pad_id) or "[PAD]")
            self._tokenizer = tok
            return tok

    def __repr__(self) -> str:
        return (f"OnnxPipeline({str(self.bundle_dir)!r}, labels={len(self.label_names)}, "
                f"threads={self.settings.get('intra_op_num_threads')})")

    @property
    def rss_argv(self) -> list[str]:
        """The command that measures this bundle's peak memory in a fresh process (used by ``bench``).

        Examples:
            >>> OnnxPipeline("bundle").rss_argv  # doctest: +SKIP
            ['/usr/bin/python3', '-m', 'runtime_shim', 'rss', 'bundle']
        """
        # An isolated parent (the installed runtime: -I, -B) starts an isolated child, so the probe too
        # imports nothing from the working directory and writes no byte code.
        flags = [f for f, on in (("-I", sys.flags.isolated), ("-B", sys.flags.dont_write_bytecode)) if on]
        argv = [sys.executable, *flags, "-m", "runtime_shim", "rss", str(self.bundle_dir.resolve())]
        if self.overrides:
            argv += ["--overrides", json.dumps(self.overrides)]
        return argv

    # ------------------------------------------------------------------------------------ the pieces

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenize (truncate to ``max_length``, pad to the longest text) into the model's inputs.

        Only the inputs the ONNX model declares are returned; ``token_type_ids`` are zeros (one segment).

        Examples:
            >>> enc = OnnxPipeline("bundle").encode(["hi there", "a longer query than that"])  # doctest: +SKIP
            >>> enc["input_ids"].shape  # doctest: +SKIP
            (2, 7)
        """
        if isinstance(texts, str):
            texts = [texts]
        if self.fallback is not None:  # forward() hands the texts it is unsure of to the fallback
            return _cascade.Encoded(self._encode(texts), texts=list(texts))
        return self._encode(texts)

    def _encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        import numpy as np

        types = self._input_types  # the model's own integer types (int32 for edgepack's fused graphs)
        if len(texts) == 1:  # unpadded: the mask and token types are constant rows
            ids = self.fast_wordpiece.encode(texts[0]) if self.fast_wordpiece is not None else None
            if ids is None:  # encode(), not encode_batch(): that hands one item to the thread pool for nothing
                ids = self.tokenizer.encode(texts[0]).ids
            return {name: np.array([ids], dtype=types[name]) if name == "input_ids"
                    else self._constant_row(name, len(ids)) for name in self.input_names}
        texts = list(texts)
        fast = self.fast_wordpiece
        rows = [fast.encode(t) for t in texts] if fast is not None else []
        if rows and all(r is not None for r in rows):  # tokenizers' padding: pad_id and mask 0 on the right
            width = max(len(r) for r in rows)
            ids = np.full((len(rows), width), self.pad_id, dtype=types.get("input_ids", "int64"))
            mask = np.zeros((len(rows), width), dtype=types.get("attention_mask", "int64"))
            for i, r in enumerate(rows):
                ids[i, :len(r)] = r
                mask[i, :len(r)] = 1
            return {name: ids if name == "input_ids" else mask if name == "attention_mask"
                    else np.zeros((len(rows), width), dtype=types[name]) for name in self.input_names}
        encs = self.tokenizer.encode_batch(texts)
        out: dict[str, np.ndarray] = {}
        for name in self.input_names:
            if name == "input_ids":
                out[name] = np.array([e.ids for e in encs], dtype=types[name])
            elif name == "attention_mask":
                out[name] = np.array([e.attention_mask for e in encs], dtype=types[name])
            else:
                out[name] = np.zeros((len(encs), len(encs[0].ids)), dtype=types[name])
        return out

    def _constant_row(self, name: str, length: int) -> np.ndarray:
        """One unpadded text's attention mask (ones) or token types (zeros), built once per length and
        kept read-only (saves ~0.8 us a query against np.ones)."""
        row = self._rows.get((name, length))
        if row is None:
            import numpy as np

            make = np.ones if name == "attention_mask" else np.zeros
            row = self._rows[(name, length)] = make((1, length), dtype=self._input_types[name])
            row.flags.writeable = False
        return row

    def forward(self, encoded: Mapping[str, np.ndarray]) -> np.ndarray:
        """Run the model on encoded inputs; return the logits ``[batch, num_labels]``.

        Examples:
            >>> pipe = OnnxPipeline("bundle")  # doctest: +SKIP
            >>> pipe.forward(pipe.encode(["set an alarm"])).shape  # doctest: +SKIP
            (1, 5)
        """
        feed = {name: encoded[name] for name in self.input_names}
        logits = self.session.run([self.output_name], feed)[0]
        if logits.shape != (len(next(iter(feed.values()))), len(self.label_names)):  # InferenceSession only warns
            raise BundleError(f"{self.model_path}: {self.output_name!r} came back with shape {list(logits.shape)} "
                              f"where it declares [batch, {len(self.label_names)}]; the model does not compute "
                              "what it declares: re-run `edgepack pack`")
        texts = getattr(encoded, "texts", None)
        if self.fallback is None or texts is None:
            return logits
        # A cascade: the rows under ``escalate_below`` get the fallback's logits.
        unsure = _cascade.unsure_rows(logits, self.escalate_below)
        if not unsure:
            return logits
        return _cascade.merged(logits, unsure, [self.fallback.forward(self.fallback.encode([texts[i]]))[0] for i in unsure])

    def predict(self, texts: Sequence[str], *, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Raw predictions: ``(label_ids [n], probs [n, num_labels])``, argmax only, no threshold.

        Examples:
            >>> ids, probs = OnnxPipeline("bundle").predict(["set an alarm for 7 am"])  # doctest: +SKIP
            >>> ids.tolist(), probs.shape  # doctest: +SKIP
            ([0], (1, 5))
        """
        import numpy as np

        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, len(self.label_names)))
        probs = np.concatenate([softmax(self.forward(self.encode(texts[i:i + batch_size])))
                                for i in range(0, len(texts), batch_size)])
        return probs.argmax(axis=-1), probs

    def label_ids(self, probs: np.ndarray, *, apply_threshold: bool = True) -> np.ndarray:
        """Label ids from probabilities: argmax, then the out-of-scope threshold when asked and set.

        Examples:
            >>> pipe = OnnxPipeline("bundle")  # doctest: +SKIP
            >>> pipe.label_ids(np.array([[0.3, 0.25, 0.2, 0.15, 0.1]])).tolist()  # threshold 0.32, oos id 3
            ... # doctest: +SKIP
            [3]
        """
        ids = probs.argmax(axis=-1)
        if not apply_threshold:
            return ids
        return thresholded(ids, probs.max(axis=-1), self.oos_id, self.oos_threshold)

    # ------------------------------------------------------------------------------------- the call

    def _classify_one(self, text: str, apply_threshold: bool) -> dict[str, Any]:
        """One text, top label only: the general path's answer with fewer array operations (a single
        query's latency is what the device notices): the model's answer output (``run_one``) or
        ``top_of_list``/``top_of_row`` over the logits gives the label, threshold applied, and its probability."""
        threshold = self.oos_threshold if apply_threshold else None
        if self._run_one is not None:
            top, k = read_answer(self._run_one(self._ids(text), self.answer_name), len(self.label_names),
                                 self.model_path, self.answer_name)
            if threshold is not None and top < threshold:
                k = self.oos_id
        elif self._run_rows is not None:
            k, top = top_of_list(self._run_rows([self._ids(text)], self.pad_id, self.output_name)[0],
                                 self.oos_id, threshold)
        else:
            k, top = top_of_row(self.forward(self._encode([text]))[0], self.oos_id, threshold)
        if self.fallback is not None and top < self.escalate_below:
            return self.fallback._classify_one(text, apply_threshold)
        return {"label": self.label_names[k], "score": top}

    def _ids(self, text: str) -> list[int]:
        """One text's token ids, truncated to ``max_length``: the fast path's, else ``tokenizers``'."""
        ids = self.fast_wordpiece.encode(text) if self.fast_wordpiece is not None else None
        return ids if ids is not None else self.tokenizer.encode(text).ids

    def _classify_rows(self, texts: list[str], apply_threshold: bool, batch_size: int) -> list[dict[str, Any]]:
        """Top label of each text through ``run_rows`` (a C API session): ``__call__``'s answer for a list
        with the default ``top_k``, and no numpy. Each batch is padded to its longest text, as ``encode`` pads."""
        threshold = self.oos_threshold if apply_threshold else None
        out: list[dict[str, Any]] = []
        unsure: list[int] = []
        for start in range(0, len(texts), batch_size):
            rows = [self._ids(t) for t in texts[start:start + batch_size]]
            for logits in self._run_rows(rows, self.pad_id, self.output_name):
                k, top = top_of_list(logits, self.oos_id, threshold)
                if self.fallback is not None and top < self.escalate_below:
                    unsure.append(len(out))
                out.append({"label": self.label_names[k], "score": top})
        for i in unsure:  # a cascade: the fallback answers these, each alone (as in forward)
            out[i] = self.fallback._classify_one(texts[i], apply_threshold)
        return out

    def __call__(self, inputs: str | Sequence[str], *, top_k: int | str | None = BEST,
                 apply_threshold: bool = True, batch_size: int = 32) -> list:
        """Classify a string or a list of strings, in the shapes of transformers' text-classification pipeline.

        - ``pipe("text")`` -> ``[{"label", "score"}]``; a list -> one dict per input (``top_k="best"``).
        - ``top_k=k`` -> the k most probable labels per input (a list of dicts for a string, of lists for a
          list); ``top_k=None`` -> every label. When the threshold fires, the out-of-scope label comes first
          (score: the top probability). ``apply_threshold=False`` -> plain argmax.

        Examples:
            >>> pipe = OnnxPipeline("bundle")  # doctest: +SKIP
            >>> pipe("check my savings balance")  # doctest: +SKIP
            [{'label': 'balance', 'score': 0.95}]
        """
        single = isinstance(inputs, str)
        best = isinstance(top_k, str) and top_k == BEST
        if not best and top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} is not valid; use a positive integer, None (every label) or {BEST!r}")
        if single and best:
            return [self._classify_one(inputs, apply_threshold)]
        texts = [inputs] if single else list(inputs)
        if best and self._run_rows is not None and texts:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size={batch_size!r} is not valid; use a positive integer")
            return self._classify_rows(texts, apply_threshold, batch_size)
        _, probs = self.predict(texts, batch_size=batch_size)
        final = self.label_ids(probs, apply_threshold=apply_threshold)
        import numpy as np

        top = probs.max(axis=-1) if len(texts) else np.zeros(0)
        out = []
        for i in range(len(texts)):
            if best:
                out.append({"label": self.label_names[int(final[i])], "score": float(top[i])})
                continue
            order = np.argsort(-probs[i], kind="stable")
            k = len(order) if top_k is None else min(top_k, len(order))
            entries = [{"label": self.label_names[j], "score": float(probs[i, j])} for j in order]
            if int(final[i]) != int(order[0]):  # the threshold fired
                entries = [{"label": self.oos_label, "score": float(top[i])}] + [
                    e for e in entries if e["label"] != self.oos_label]
            out.append(entries[:k])
        if best or not single:
            return out
        return out[0]
