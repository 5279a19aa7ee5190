"""Dense references written from the paper equations (torchtune style), independent of lowrank.

Each takes the adapter's tensors P (by name) and the *pretrained* weight W0 (out x in) and returns
W_eff as one dense matrix; the test then runs F.linear(x, W_eff, b).
"""
import torch


def unit(u):
    return u / u.norm(dim=-1, keepdim=True)


def block_householder(u, coef):
    """I + Σ coef_k ûû_kᵀ, block-diagonal: u is a list of (coef, (blocks, m)) pairs."""
    blocks = []
    n = u[0][1].shape[0]
    for b in range(n):
        m = u[0][1].shape[1]
        H = torch.eye(m, dtype=u[0][1].dtype)
        for c, vecs in u:
            v = unit(vecs[b])
            H = H + c * torch.outer(v, v)
        blocks.append(H)
    return torch.block_diag(*blocks)


def lora(P, W0, cfg):  # DeLoRA Eq. 1: W + (α/r) B A
    return W0 + cfg.scale * P["lora_B"] @ P["lora_A"]


def dora(P, W0, cfg):  # DoRA Eq. 5: m (W0 + BA) / ‖W0 + BA‖_row
    V = W0 + cfg.scale * P["lora_B"] @ P["lora_A"]
    n = V.norm(dim=1, keepdim=True)
    if cfg.dora_detach_norm:
        n = n.detach()
    return P["lora_magnitude"][:, None] * V / n


def delora_norm(W0, cfg):
    if cfg.delora_norm == "column":
        return W0.norm(dim=0, keepdim=True)   # ‖W̄_:,j‖ scales column j
    if cfg.delora_norm == "frobenius":
        return W0.norm()
    return torch.tensor(1.0)


def delora(P, W0, cfg):  # DeLoRA Eq. 15 (+ Eq. 9 for subtract): W̄ + λ‖W̄‖/r B Ξ A − (same)_0
    def term(A, B, lam):
        eps = cfg.delora_eps
        Xi = torch.diag(1.0 / (B.norm(dim=0).clamp_min(eps) * A.norm(dim=1).clamp_min(eps)))
        return lam / cfg.rank * (B @ Xi @ A) * delora_norm(W0, cfg)
    dW = term(P["delora_A"], P["delora_B"], P["delora_lambda"])
    if cfg.delora_init == "subtract":
        dW = dW - term(P["delora_A0"], P["delora_B0"], P["delora_lambda0"])
    return W0 + dW


def ether(P, W0, cfg):  # DeLoRA Eq. 2: H W, H = I − 2ûûᵀ
    return block_householder([(-2.0, P["ether_u"])], None) @ W0


def etherplus(P, W0, cfg):  # DeLoRA Eq. 3: H⁺ W H̃⁺
    H = block_householder([(-1.0, P["ether_u"]), (1.0, P["ether_v"])], None)
    if cfg.etherplus_one_sided:
        return H @ W0
    Ht = block_householder([(-1.0, P["ether_u_in"]), (1.0, P["ether_v_in"])], None)
    return H @ W0 @ Ht


def dyndora(P, W0, cfg):  # DynDoRA Eq. 6: W0 + s Σ c_i b_i a_iᵀ,  s = α/r'
    s = cfg.alpha / cfg.dyndora_initial_rank
    return W0 + s * sum(P["dyndora_c"][i] * torch.outer(P["dyndora_B"][:, i], P["dyndora_A"][i])
                        for i in range(P["dyndora_c"].numel()))


def deltalora(P, W0, cfg):  # Delta-LoRA Eq. 6 telescoped: W_t + sBA = W0 + (1+λ)s·BA − λs·B_K A_K after step K
    s, lam = cfg.scale, cfg.deltalora_ratio
    W = W0 + s * P["lora_B"] @ P["lora_A"]
    if P["deltalora_started"]:
        W = W + lam * s * (P["lora_B"] @ P["lora_A"] - P["deltalora_B_start"] @ P["deltalora_A_start"])
    return W


def mult_highrank(P, W0, cfg, r=None):  # DeLoRA Eq. 12-14: (I − (λ/r)UΣUᵀ + (λ/r)VΘVᵀ) W, Σ_ii = 1/‖u_i‖²
    r = cfg.rank if r is None else r
    U, V = P["mult_u"].T, P["mult_v"].T                     # columns u_i, v_i (out x r/2)
    Sigma, Theta = torch.diag(1.0 / U.norm(dim=0) ** 2), torch.diag(1.0 / V.norm(dim=0) ** 2)
    H = torch.eye(W0.shape[0], dtype=W0.dtype) - P["mult_lambda"] / r * (U @ Sigma @ U.T - V @ Theta @ V.T)
    return H @ W0


def mult_bounded(P, W0, cfg):  # DeLoRA Eq. 10: (I − (λ/2)ûûᵀ + (λ/2)v̂v̂ᵀ) W
    u, v = unit(P["mult_u"][0]), unit(P["mult_v"][0])
    H = torch.eye(W0.shape[0], dtype=W0.dtype) - P["mult_lambda"] / 2 * (torch.outer(u, u) - torch.outer(v, v))
    return H @ W0


def mult_relaxed(P, W0, cfg):  # DeLoRA §2.2 relaxation: (I − (λ/r)(BΞA − DΦC)) W, Ξ_ii = 1/(‖b_i‖‖a_i‖)
    A, B, C, D = (P[f"mult_{k}"] for k in "ABCD")
    Xi = torch.diag(1.0 / (B.norm(dim=0) * A.norm(dim=1)))
    Phi = torch.diag(1.0 / (D.norm(dim=0) * C.norm(dim=1)))
    H = torch.eye(W0.shape[0], dtype=W0.dtype) - P["mult_lambda"] / cfg.rank * (B @ Xi @ A - D @ Phi @ C)
    return H @ W0


REFERENCES = {"lora": lora, "dora": dora, "delora": delora, "ether": ether, "etherplus": etherplus,
              "deltalora": deltalora, "dyndora": dyndora,
              "mult_relaxed": mult_relaxed, "mult_highrank": mult_highrank, "mult_bounded": mult_bounded}
