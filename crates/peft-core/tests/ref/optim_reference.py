"""Reference numbers for the peft-core optimizer tests, in plain Python floats (double precision).

Each function follows PyTorch's single-tensor code path line by line
(torch/optim/adamw.py `_single_tensor_adamw`, torch/optim/sgd.py `_single_tensor_sgd`,
transformers/optimization.py schedule lambdas, torch/nn/utils/clip_grad.py `clip_grad_norm_`), so the printed
values are what torch computes in float64. Run: python3 optim_reference.py
"""
import math


def lerp(a, b, w):
    return a + w * (b - a) if abs(w) < 0.5 else b - (b - a) * (1 - w)


def adamw(p, grads, lr, wd, betas=(0.9, 0.999), eps=1e-8, lr_factor=1.0):
    b1, b2 = betas
    lr = lr * lr_factor
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    out = []
    for step, g in enumerate(grads, start=1):
        p = [x * (1 - lr * wd) for x in p]
        m = [lerp(mi, gi, 1 - b1) for mi, gi in zip(m, g)]
        v = [vi * b2 + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        bc1 = 1 - b1**step
        bc2 = 1 - b2**step
        step_size = lr / bc1
        bc2_sqrt = math.sqrt(bc2)
        p = [pi - step_size * mi / (math.sqrt(vi) / bc2_sqrt + eps) for pi, mi, vi in zip(p, m, v)]
        out.append(p)
    return out, m, v


def sgd(p, grads, lr, momentum=0.0, dampening=0.0, wd=0.0, nesterov=False):
    buf = None
    out = []
    for g in grads:
        if wd != 0:
            g = [gi + wd * pi for gi, pi in zip(g, p)]
        if momentum != 0:
            if buf is None:
                buf = list(g)
            else:
                buf = [bi * momentum + (1 - dampening) * gi for bi, gi in zip(buf, g)]
            if nesterov:
                g = [gi + momentum * bi for gi, bi in zip(g, buf)]
            else:
                g = buf
        p = [pi - lr * gi for pi, gi in zip(p, g)]
        out.append(p)
    return out, buf


def linear_sched(step, warmup, total):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def cosine_sched(step, warmup, total, num_cycles=0.5):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def clip(grads, max_norm):
    total = math.sqrt(sum(x * x for g in grads for x in g))
    coef = max_norm / (total + 1e-6)
    coef = min(coef, 1.0)
    return total, [[x * coef for x in g] for g in grads]


if __name__ == "__main__":
    G = [[0.1, -0.2, 0.3], [-0.3, 0.1, 0.2], [0.05, 0.0, -0.4]]
    P0 = [0.5, -1.0, 2.0]
    print("adamw three steps:", repr(adamw(P0, G, 0.1, 0.1)))
    print("adamw large eps, small betas:", repr(adamw(P0, G, 0.1, 0.1, betas=(0.5, 0.6), eps=0.1)))
    print("adamw group a:", repr(adamw([1.0, -1.0], [[0.2, -0.4]], 0.1, 0.5, lr_factor=0.5)[0]))
    print("adamw group b:", repr(adamw([1.0, -1.0], [[0.2, -0.4]], 0.01, 0.0, lr_factor=0.5)[0]))
    print("sgd plain wd:", repr(sgd(P0, G, 0.1, wd=0.1)))
    print("sgd momentum dampening:", repr(sgd(P0, G, 0.1, momentum=0.9, dampening=0.1, wd=0.1)))
    print("sgd nesterov:", repr(sgd(P0, G, 0.1, momentum=0.9, nesterov=True, wd=0.1)))
    for s in [0, 1, 5, 10, 11, 55, 99, 100, 101]:
        print("sched", s, repr(linear_sched(s, 10, 100)), repr(cosine_sched(s, 10, 100)))
    print("cosine 2 cycles:", [repr(cosine_sched(s, 0, 8, 2.0)) for s in range(9)])
    print("clip:", repr(clip([[3.0, 4.0], [12.0]], 1.0)))
    print("clip no-op:", repr(clip([[3.0, 4.0], [12.0]], 20.0)))
