"""Where Dynamic LoRA's rank moves at a reallocation: a pure function of the smoothed scores."""

from __future__ import annotations


def plan_moves(
    scores: list[list[float]],
    active: list[int],
    protected: list[list[bool]],
    groups: list[list[int]],
    min_rank: int,
    max_rank: int,
    hysteresis: float,
    max_moves: list[int],
) -> list[tuple[int, int, int]]:
    """Which components move where, as (donor module, donor component, receiver module).

    Within each group, repeatedly: the donor is the module whose weakest prunable active
    component has the lowest smoothed sensitivity (and which is above min_rank); the receiver is
    the module (below max_rank) whose weakest prunable component has the highest. A component
    moves only if hysteresis * receiver's weakest > donor's weakest: rank goes where the marginal
    component is clearly worth more, which is the optimality condition of keeping the highest
    scoring components under a fixed total (AdaLoRA's global threshold), plus a margin against
    churn. A module that donated this round does not receive, and the other way round.
    """
    moves: list[tuple[int, int, int]] = []
    active = list(active)
    # per module: its prunable active components sorted weakest first (score, index)
    queues = {
        m: sorted((scores[m][i], i) for i in range(active[m]) if not protected[m][i]) for group in groups for m in group
    }
    heads = {m: 0 for m in queues}
    for group, budget in zip(groups, max_moves):
        role: dict[int, str] = {}
        for _ in range(max(0, int(budget))):

            def weakest(m):
                q = queues[m]
                return q[heads[m]] if heads[m] < len(q) else None

            donors = [
                (w[0], m, w[1])
                for m in group
                if role.get(m) != "receiver" and active[m] > min_rank and (w := weakest(m)) is not None
            ]
            if not donors:
                break
            d_score, donor, component = min(donors)
            receivers = [
                (-w[0], m)
                for m in group
                if m != donor and role.get(m) != "donor" and active[m] < max_rank and (w := weakest(m)) is not None
            ]
            if not receivers:
                break
            neg_score, receiver = min(receivers)
            if not hysteresis * (-neg_score) > d_score:
                break
            moves.append((donor, component, receiver))
            heads[donor] += 1
            active[donor] -= 1
            active[receiver] += 1
            role[donor], role[receiver] = "donor", "receiver"
    return moves
