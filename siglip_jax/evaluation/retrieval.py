"""Placeholder until the blocked implementation lands."""
import numpy as np


def retrieval_metrics(image_embeddings, text_embeddings, caption_image_ids, ks=(1, 5, 10)):
    scores = np.asarray(image_embeddings) @ np.asarray(text_embeddings).T
    ids = np.asarray(caption_image_ids)
    out = {}
    i2t_ranks = []
    for i in range(scores.shape[0]):
        best = scores[i, ids == i].max()
        i2t_ranks.append(1 + np.sum(scores[i] > best))
    t2i_ranks = [1 + np.sum(scores[:, j] > scores[ids[j], j]) for j in range(scores.shape[1])]
    for k in ks:
        out[f"image_to_text/recall@{k}"] = float(np.mean(np.array(i2t_ranks) <= k))
        out[f"text_to_image/recall@{k}"] = float(np.mean(np.array(t2i_ranks) <= k))
    out["image_to_text/median_rank"] = float(np.median(i2t_ranks))
    out["text_to_image/median_rank"] = float(np.median(t2i_ranks))
    out["mean_recall"] = float(np.mean([v for k, v in out.items() if "recall@" in k]))
    return out
