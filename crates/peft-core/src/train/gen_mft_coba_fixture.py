"""Writes mft_coba_fixture.in: CoBa weights from the reference's `CoBaStatus.compute_per_task_weight`
(codefuse-ai/MFTCoder @8ba13f44, mftcoder_accelerate/src/utils/loss_utils.py), ported to plain Python lists
(no torch here) together with the training loop's timeline: at step c the weights are computed when
c >= warmup from the validation losses sampled after steps 1..c-1 (raw losses: `valid_task_loss_begining` stays
ones), uniform before. Run: python3 gen_mft_coba_fixture.py > mft_coba_fixture.in
"""
import math

N, WARMUP, L, TAU = 3, 3, 4, 5.0
HIST = [
    [2.0, 1.0, 3.0],
    [1.8, 0.99, 2.9],
    [1.7, 0.985, 2.5],
    [1.55, 0.984, 2.45],
    [1.5, 0.99, 2.2],
    [1.42, 0.97, 2.1],
]


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def fit_window_slope(x, y):
    # y = y[y != 0]; x = x[:len(y)]; weights all 1; solve (X^T X) w = X^T y with X = [x, 1]
    y = [v for v in y if v != 0]
    x = x[: len(y)]
    if len(y) < 2:
        return 0.0
    n = len(y)
    sxx = sum(a * a for a in x)
    sx = sum(x)
    sxy = sum(a * b for a, b in zip(x, y))
    sy = sum(y)
    return (n * sxy - sx * sy) / (sxx * n - sx * sx)


class CoBa:
    def __init__(self):
        self.history = None  # per task: list over sampled steps
        self.per_task_slope_list = None  # per task: list over computations
        self.total_slope_list = None
        self.minimum_weight = 1 / (N * 10)

    def sample(self, losses):
        if self.history is None:
            self.history = [[v] for v in losses]
        else:
            for i in range(N):
                self.history[i].append(losses[i])

    def compute(self, c):
        start = max(0, c - L)
        steps = list(range(start, c))
        slopes = [fit_window_slope(steps, self.history[i][-len(steps):]) for i in range(N)]
        cols = len(self.history[0])
        maxes = [max(self.history[i][k] for i in range(N)) for k in range(cols)][-len(steps):]
        total = fit_window_slope(steps, maxes)
        if c == WARMUP:
            self.per_task_slope_list = [[s] for s in slopes]
            self.total_slope_list = [total]
        else:
            for i in range(N):
                self.per_task_slope_list[i].append(slopes[i])
            self.total_slope_list.append(total)
        a = sum(abs(s) for s in slopes)
        rcs = softmax([N * s / a for s in slopes])
        rows = [row[start:] for row in self.per_task_slope_list]
        k = len(rows[0])
        rn = [[-k * v / sum(abs(u) for u in row) for v in row] for row in rows]
        acs = softmax([row[-1] for row in rn])
        kt = len(self.total_slope_list)
        ta = sum(abs(t) for t in self.total_slope_list)
        df = softmax([-kt * t / ta * TAU for t in self.total_slope_list])[-1] * kt
        w = softmax([(df * r + (1 - df) * q) * N for r, q in zip(rcs, acs)])
        if any(v < self.minimum_weight for v in w):
            w = [v * (1 - self.minimum_weight * N) + self.minimum_weight for v in w]
        return w


coba = CoBa()
out = []
for c in range(len(HIST) + 2):
    w = coba.compute(c) if c >= WARMUP else [1 / N] * N
    if c >= 2:
        out.append(w)  # the weights for step c, after c - 1 samples
    if c >= 1 and c - 1 < len(HIST):
        coba.sample(HIST[c - 1])
print("[")
for w in out[: len(HIST)]:
    print("    [" + ", ".join(repr(v) for v in w) + "],")
print("]")
