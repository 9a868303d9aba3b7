"""A seeded synthetic click stream with the drift that makes freshness matter.

The generative story, in stream time (``days`` days of traffic):

- **Items** belong to a category and carry a latent taste vector near their category's
  centre plus an *appeal* (a logit offset). A catalogue exists at t=0; **new items keep
  appearing** (births spread over the whole stream), each arriving with a burst of
  popularity that decays with age (half-life ``novelty_days``), so the head of the
  power-law popularity curve **shifts** to items the initial model never saw.
- **Appeal drifts**: every item's appeal takes a random walk (``appeal_walk`` per
  square-root day): items go in and out of fashion, the per-row effect a served model
  loses first.
- **Popularity** is power-law: every item has a Zipf weight (exponent ``zipf``) times its
  novelty factor; events pick items by that weight.
- **Users** have a power-law activity and a taste vector built from a few favourite
  categories. **Interests move**: every user's taste takes a small random-walk step each
  time block, and users occasionally switch to a new favourite category.
- **Labels**: ``P(click) = sigmoid(gain * <user, item> + appeal + user bias + bias)``.

Tables are shaped like production ones: far more rows (50k users, 26k items) than any
one window touches (a few thousand), most of them cold. Features: tables ``user``,
``item``, ``category`` (closed vocabularies: rows exist for items not yet born, as a
hashed production table would have); dense: hour of day (sin, cos), log item age, and
log-counts of the user's and the item's events in the previous 24 hours (windowed
counters, as a feature store keeps).
"""

from __future__ import annotations

import numpy as np

from .streams import Stream, _hour_features, _log_count, _trailing_counts

__all__ = ["DEFAULT_EVENTS", "synthetic_stream"]

#: default stream length: `lukern replay` with no arguments stays well under 3 minutes
#: on 2 cores (measured with the default flags; see the README).
DEFAULT_EVENTS = 240_000


def _draw(rng, cdf, k):
    """k draws from the weights whose running sum is ``cdf`` (inverse-CDF sampling: one
    binary search per draw, no per-call normalisation of a long weight vector)."""
    return np.minimum(np.searchsorted(cdf, rng.random(k) * cdf[-1], side="right"), cdf.shape[0] - 1)


def _normalise(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def synthetic_stream(n_events=DEFAULT_EVENTS, *, seed=0, n_users=50_000, n_items=20_000, new_items=6000,
                     n_categories=24, days=28.0, latent=8, zipf=1.1, novelty_days=3.0, user_zipf=0.9,
                     walk=0.05, switch_per_day=0.03, gain=3.5, bias=-1.0, appeal_walk=0.3, n_blocks=None,
                     start=1_704_067_200) -> Stream:
    """Generate a time-ordered synthetic stream (deterministic for a given ``seed``).

    Parameters
    ----------
    n_events : int
        Number of interactions.
    seed : int
    n_users, n_items, new_items, n_categories : int
        Users, items present at t=0, items born during the stream, item categories.
    days : float
        Stream length in days (timestamps are Unix seconds from ``start``).
    latent : int
        Width of the hidden taste vectors.
    zipf, user_zipf : float
        Power-law exponents of item popularity and user activity.
    novelty_days : float
        Half-life of a new item's popularity burst.
    walk : float
        Random-walk step of every user's taste per time block.
    switch_per_day : float
        Probability per user and day of switching to a new favourite category.
    gain, bias : float
        Scale of the taste match and the global logit offset.
    appeal_walk : float
        Random-walk step per square-root day of every item's appeal (its logit offset):
        items go in and out of fashion.
    n_blocks : int, optional
        Time blocks of the simulation (drift steps); default one per 2 hours.
    start : int
        Unix time of the stream's start (default 2024-01-01 00:00 UTC, a midnight).

    Examples
    --------
    >>> s = synthetic_stream(n_events=5000, seed=1)
    >>> len(s), s.cat_names, bool((s.t[1:] >= s.t[:-1]).all())
    (5000, ['user', 'item', 'category'], True)
    """
    n_events = int(n_events)
    if n_events < 1:
        raise ValueError(f"`n_events` must be >= 1; got {n_events}.")
    for name, v in (("n_users", n_users), ("n_items", n_items), ("n_categories", n_categories), ("latent", latent)):
        if int(v) < 1:
            raise ValueError(f"`{name}` must be >= 1; got {v}.")
    if new_items < 0 or days <= 0:
        raise ValueError(f"`new_items` must be >= 0 and `days` > 0; got {new_items} and {days}.")
    rng = np.random.default_rng(seed)
    span = float(days) * 86400.0
    n_all = int(n_items) + int(new_items)
    n_blocks = int(n_blocks) if n_blocks else max(1, int(round(days * 12)))

    centres = _normalise(rng.standard_normal((n_categories, latent)))
    cat_pop = 1.0 / np.arange(1, n_categories + 1) ** 0.8
    item_cat = rng.choice(n_categories, size=n_all, p=cat_pop / cat_pop.sum())
    item_vec = _normalise(centres[item_cat] + 0.6 * rng.standard_normal((n_all, latent)) / np.sqrt(latent))
    item_q = 0.6 * rng.standard_normal(n_all)
    birth = np.zeros(n_all)
    birth[n_items:] = np.sort(rng.uniform(0.0, span, int(new_items)))
    # Zipf weight by a random rank: popularity does not follow the id order.
    item_w = 1.0 / (1.0 + rng.permutation(n_all)) ** zipf
    # New items are born popular: their rank weight is drawn from the head of the curve.
    item_w[n_items:] = 1.0 / (1.0 + rng.integers(0, max(n_all // 20, 1), int(new_items))) ** zipf

    fav = rng.choice(n_categories, size=(n_users, 2), p=cat_pop / cat_pop.sum())
    user_vec = _normalise(centres[fav].sum(axis=1) + 0.5 * rng.standard_normal((n_users, latent)) / np.sqrt(latent))
    user_b = 0.5 * rng.standard_normal(n_users)
    user_w = 1.0 / (1.0 + rng.permutation(n_users)) ** user_zipf
    user_cdf = np.cumsum(user_w)

    # Events per block follow a diurnal rate (busier in the evening).
    edges = np.linspace(0.0, span, n_blocks + 1)
    mids = 0.5 * (edges[:-1] + edges[1:])
    rate = 1.0 + 0.6 * np.sin(2 * np.pi * ((mids % 86400.0) / 86400.0 - 0.4))
    counts = rng.multinomial(n_events, rate / rate.sum())

    t = np.empty(n_events)
    users = np.empty(n_events, np.int64)
    items = np.empty(n_events, np.int64)
    logits = np.empty(n_events)
    half_life = novelty_days * 86400.0
    block_days = span / n_blocks / 86400.0
    pos = 0
    for b in range(n_blocks):
        k = int(counts[b])
        # Drift first: tastes walk, a few users switch favourite category.
        user_vec += walk * np.sqrt(block_days) * rng.standard_normal(user_vec.shape) / np.sqrt(latent)
        switch = rng.random(n_users) < switch_per_day * block_days
        if switch.any():
            new_fav = rng.choice(n_categories, size=int(switch.sum()), p=cat_pop / cat_pop.sum())
            user_vec[switch] = 0.4 * user_vec[switch] + 0.9 * centres[new_fav]
        user_vec = _normalise(user_vec)
        if appeal_walk:
            item_q += appeal_walk * np.sqrt(block_days) * rng.standard_normal(n_all)
        if k == 0:
            continue
        tb = np.sort(rng.uniform(edges[b], edges[b + 1], k))
        age = mids[b] - birth
        alive = age >= 0
        novelty = np.where(alive, 0.25 + 4.0 * 0.5 ** (np.maximum(age, 0) / half_life), 0.0)
        w = item_w * novelty
        u = _draw(rng, user_cdf, k)
        i = _draw(rng, np.cumsum(w), k)
        # Items born inside this block cannot be seen before their birth.
        tb = np.maximum(tb, birth[i])
        order = np.argsort(tb, kind="stable")
        tb, u, i = tb[order], u[order], i[order]
        t[pos:pos + k] = tb
        users[pos:pos + k] = u
        items[pos:pos + k] = i
        logits[pos:pos + k] = gain * np.einsum("nd,nd->n", user_vec[u], item_vec[i]) + item_q[i] + user_b[u] + bias
        pos += k
    order = np.argsort(t, kind="stable")
    t, users, items, logits = t[order], users[order], items[order], logits[order]
    labels = (rng.random(n_events) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    t = t + float(start)
    birth = birth + float(start)
    hs, hc = _hour_features(t)
    age_days = np.maximum(t - birth[items], 0.0) / 86400.0
    day = 86400.0
    dense = np.stack([hs, hc, (np.log1p(age_days) / 3.0).astype(np.float32),
                      _log_count(_trailing_counts(users, t, day)), _log_count(_trailing_counts(items, t, day))],
                     axis=1).astype(np.float32)
    cat = np.stack([users, items, item_cat[items]], axis=1).astype(np.int64)
    return Stream(name=f"synthetic(seed={seed}, n={n_events})", format="synthetic", t=t, dense=dense, cat=cat,
                  labels=labels, cat_names=["user", "item", "category"],
                  cat_sizes=[int(n_users), n_all, int(n_categories)],
                  dense_names=["hour_sin", "hour_cos", "log_item_age", "log_user_events_24h", "log_item_events_24h"],
                  hashed=[False, False, False], was_sorted=True, source="synthetic")
