"""What top-K caching changes: KL(full || cached soft targets) at the KD temperature, measured on
a real teacher's outputs over the training views it is cached for (x and a CutMixPick pool).

    python benchmarks/teacher_cache_kl.py --data DIR --teacher NAME --teacher-weights W \
        [--aug cutmixpick --image-size 224 --batch-size 64 --steps 20 --topk 1,2,5,12]

For each K: the mean and the largest per-row KL in nats (float64), and the mean teacher mass at
T outside the top K (the remainder the cache spreads uniformly; docs/teacher_cache.md). The
student's normalization is ImageNet's (a torchvision student), as in training.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--teacher-weights", required=True)
    ap.add_argument("--aug", default="cutmixpick")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--topk", default="1,2,3,5,8,12")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from dalikd import loaders, recipes
    from dalikd.batch import IMAGENET_NORM
    from dalikd.config import DataConfig
    from dalikd.data import scan_dataset
    from dalikd.device import prepare_images
    from dalikd.models import adapt_input, build_model
    from dalikd.teacher_cache import soft_target_kl

    torch.manual_seed(0)
    dataset = scan_dataset(args.data)
    teacher = build_model(args.teacher, dataset.num_classes, args.teacher_weights, role="teacher")
    teacher = adapt_input(teacher.eval(), IMAGENET_NORM)
    data = DataConfig(path=args.data, image_size=args.image_size, batch_size=args.batch_size,
                      threads=args.threads)  # fmt: skip
    loader = loaders.train_loader(dataset.train, data, recipes.resolve(args.aug), device="cpu",
                                   seed=0)  # fmt: skip
    logits = []
    with torch.inference_mode():
        for step, batch in enumerate(loader):
            if step == args.steps:
                break
            views = [batch.images] + ([batch.aug_images] if batch.aug_images is not None else [])
            logits.append(teacher(prepare_images(torch.cat(views), "cpu", IMAGENET_NORM)))
    z = torch.cat(logits).double()
    t = args.temperature
    probs = torch.softmax(z / t, dim=1)
    classes = z.shape[1]
    print(f"teacher {args.teacher} ({args.teacher_weights}), {classes} classes, {len(z)} rows "
          f"(x and the {args.aug} views of {min(step, args.steps)} steps), T = {t:g}")  # fmt: skip
    print(f"{'K':>4} {'mean KL (nats)':>15} {'max KL':>10} {'mass outside top K':>19}")
    for k in (int(v) for v in args.topk.split(",")):
        if not 1 <= k <= classes:
            continue
        kl = soft_target_kl(z.float(), k, t)
        outside = 1 - probs.topk(k, dim=1).values.sum(dim=1)
        print(f"{k:>4} {kl.mean().item():>15.3e} {kl.max().item():>10.3e} "
              f"{outside.mean().item():>19.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
