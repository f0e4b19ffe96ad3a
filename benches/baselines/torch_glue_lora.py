#!/usr/bin/env python3
"""PyTorch reference for `cargo xtask bench --baseline pytorch`.

Fine-tunes sentence-transformers/all-MiniLM-L6-v2 with LoRA (transformers + peft) on one GLUE task with the same
recipe as the Rust bench: the same training rows (indices file written by the bench), max_len 128, length-bucketed
batches, AdamW (weight decay off for biases/LayerNorm) with linear warmup/decay, grad-norm clip, evaluation on the
full dev set. Prints one JSON line: metrics, train seconds, samples/s, trainable params, versions.
"""
import argparse
import csv
import json
import math
import random
import sys
import time
import types

import numpy as np
import torch

csv.field_size_limit(sys.maxsize)

# (text a column, text b column, label column, has header)
COLUMNS = {
    "sst2": ("SST-2", "sentence", None, "label"),
    "mrpc": ("MRPC", "#1 String", "#2 String", "Quality"),
    "cola": ("CoLA", 3, None, 1),
    "stsb": ("STS-B", "sentence1", "sentence2", "score"),
    "rte": ("RTE", "sentence1", "sentence2", "label"),
    "wnli": ("WNLI", "sentence1", "sentence2", "label"),
}


def load(glue_dir, task, split):
    d, a, b, lab = COLUMNS[task]
    with open(f"{glue_dir}/{d}/{split}.tsv", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if isinstance(a, str):
        h = rows[0]
        rows = rows[1:]
        ia, ib, il = h.index(a), (h.index(b) if b else None), h.index(lab)
    else:
        ia, ib, il = a, None, lab
    out = []
    for r in rows:
        if not r:
            continue
        y = r[il]
        if task == "stsb":
            y = float(y)
        elif y in ("entailment", "not_entailment"):
            y = 0 if y == "entailment" else 1
        else:
            y = int(y)
        out.append((r[ia], r[ib] if ib is not None else None, y))
    return out


def _avg_ranks(v):
    """1-based ranks, ties averaged (scipy.stats.rankdata)."""
    order = np.argsort(v, kind="mergesort")
    r = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def length_batches(lens, bs, rng):
    idx = list(range(len(lens)))
    if rng is None:
        idx.sort(key=lambda i: lens[i])
        return [idx[i:i + bs] for i in range(0, len(idx), bs)]
    rng.shuffle(idx)
    out = []
    for p in range(0, len(idx), bs * 50):
        pool = sorted(idx[p:p + bs * 50], key=lambda i: lens[i])
        out += [pool[i:i + bs] for i in range(0, len(pool), bs)]
    rng.shuffle(out)
    return out


def main():
    ap = argparse.ArgumentParser()
    for k, t, dflt in [("task", str, None), ("glue-dir", str, None), ("model-dir", str, None), ("indices", str, None),
                       ("epochs", int, 1), ("batch-size", int, 32), ("lr", float, 5e-4), ("warmup-frac", float, 0.06),
                       ("weight-decay", float, 0.01), ("max-grad-norm", float, 1.0), ("max-len", int, 128),
                       ("seed", int, 0), ("threads", int, 2), ("r", int, 8), ("alpha", float, 16.0),
                       ("dropout", float, 0.0), ("targets", str, "query,value"), ("pooling", str, "mean")]:
        ap.add_argument("--" + k, type=t, default=dflt)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    np.random.seed(a.seed)
    import transformers
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    n_out = 1 if a.task == "stsb" else 2
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if a.pooling == "cls":
        # transformers' BertForSequenceClassification: CLS -> pooler.dense + tanh -> dropout -> classifier
        model = AutoModelForSequenceClassification.from_pretrained(a.model_dir, num_labels=n_out,
                                                                   torch_dtype=torch.float32)
        cfg = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=a.targets.split(","),
                              modules_to_save=["classifier"], task_type="SEQ_CLS")
        model = peft.get_peft_model(model, cfg)
    else:
        # what `cargo xtask bench` trains: masked mean pooling (as sentence-transformers uses all-MiniLM-L6-v2),
        # hidden dropout, a fresh N(0, initializer_range) classifier with zero bias
        from transformers import AutoModel

        class MeanPoolClassifier(torch.nn.Module):
            def __init__(self):
                super().__init__()
                backbone = AutoModel.from_pretrained(a.model_dir, torch_dtype=torch.float32, add_pooling_layer=False)
                cfg = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                      target_modules=a.targets.split(","))
                self.backbone = peft.get_peft_model(backbone, cfg)
                c = backbone.config
                self.drop = torch.nn.Dropout(c.hidden_dropout_prob)
                self.classifier = torch.nn.Linear(c.hidden_size, n_out)
                torch.nn.init.normal_(self.classifier.weight, std=c.initializer_range)
                torch.nn.init.zeros_(self.classifier.bias)

            def forward(self, input_ids, token_type_ids, attention_mask):
                h = self.backbone(input_ids=input_ids, token_type_ids=token_type_ids,
                                  attention_mask=attention_mask).last_hidden_state
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                return types.SimpleNamespace(logits=self.classifier(self.drop(pooled)))

        model = MeanPoolClassifier()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train = load(a.glue_dir, a.task, "train")
    if a.indices:
        with open(a.indices) as f:
            train = [train[i] for i in json.load(f)]
    dev = load(a.glue_dir, a.task, "dev")

    def enc(rows):
        x = [r[0] for r in rows]
        y = [r[1] for r in rows] if rows[0][1] is not None else None
        e = tok(x, y, truncation=True, max_length=a.max_len, padding=False)
        return e["input_ids"], e["token_type_ids"]

    def collate(ids, tts, idx):
        L = max(len(ids[i]) for i in idx)
        pad = lambda v: v + [0] * (L - len(v))
        return (torch.tensor([pad(ids[i]) for i in idx]), torch.tensor([pad(tts[i]) for i in idx]),
                torch.tensor([[1] * len(ids[i]) + [0] * (L - len(ids[i])) for i in idx]))

    tr_ids, tr_tt = enc(train)
    dv_ids, dv_tt = enc(dev)
    ytr = [r[2] for r in train]
    rng = random.Random(a.seed)
    epochs = [length_batches([len(x) for x in tr_ids], a.batch_size, rng) for _ in range(a.epochs)]
    total = sum(len(e) for e in epochs)
    warm = round(a.warmup_frac * total)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    model.train()
    t0 = time.perf_counter()
    n_seen = 0
    for idx in (b for e in epochs for b in e):
        ii, tt, mm = collate(tr_ids, tr_tt, idx)
        out = model(input_ids=ii, token_type_ids=tt, attention_mask=mm)
        y = torch.tensor([ytr[i] for i in idx])
        if n_out == 1:
            loss = torch.nn.functional.mse_loss(out.logits.squeeze(-1), y.float())
        else:
            loss = torch.nn.functional.cross_entropy(out.logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        n_seen += len(idx)
    train_s = time.perf_counter() - t0
    model.eval()
    preds = [None] * len(dev)
    with torch.no_grad():
        for idx in length_batches([len(x) for x in dv_ids], max(32, a.batch_size), None):
            ii, tt, mm = collate(dv_ids, dv_tt, idx)
            lg = model(input_ids=ii, token_type_ids=tt, attention_mask=mm).logits
            for i, row in zip(idx, lg.tolist()):
                preds[i] = row
    gold = [r[2] for r in dev]
    m = {}
    if n_out == 1:
        p = np.array([x[0] for x in preds])
        g = np.array(gold, dtype=float)
        m["pearson"] = float(np.corrcoef(p, g)[0, 1])
        rank = lambda v: _avg_ranks(v)
        m["spearman"] = float(np.corrcoef(rank(p), rank(g))[0, 1])
    else:
        p = np.array([int(np.argmax(x)) for x in preds])
        g = np.array(gold)
        tp, fp = float(np.sum((p == 1) & (g == 1))), float(np.sum((p == 1) & (g == 0)))
        fn, tn = float(np.sum((p == 0) & (g == 1))), float(np.sum((p == 0) & (g == 0)))
        if a.task == "cola":
            den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            m["mcc"] = (tp * tn - fp * fn) / den if den else 0.0
        else:
            m["acc"] = float(np.mean(p == g))
        if a.task == "mrpc":
            m["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    print(json.dumps({
        "metrics": m, "train_seconds": train_s, "samples_per_sec": n_seen / train_s, "trainable_params": trainable,
        "info": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                 "threads": a.threads, "r": a.r, "alpha": a.alpha, "targets": a.targets, "lr": a.lr},
    }))


if __name__ == "__main__":
    main()
