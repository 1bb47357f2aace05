"""The equations of ``structure kronecker(basis = eigen)`` for ``curvc explain``: the
rotation into the factors' eigenbasis, the diagonal pipeline there, the rotation back."""
from __future__ import annotations

from curvc import explain as base, ir
from curvc.plan_numbers import Numbers, Root


def eigenbasis(opt: ir.Optimizer, lr: str, nums: Numbers) -> list[str]:
    st = opt.structure
    v = base._v
    beta = v(st.factor_beta)
    vectors = {ir.Const(True): "", ir.Const(False): ", and vectors,"}.get(
        st.vectors, f", and vectors unless {v(st.vectors)},")
    eq = ["G     = g as a matrix; an order-k tensor has one basis Q_i per mode i (modes",
          f"        longer than max_dim = {v(st.max_dim)}{vectors} keep Q_i = I)"]
    if st.merge_dims != ir.Const(False):
        condition = "" if st.merge_dims == ir.Const(True) else f", if {v(st.merge_dims)}"
        eq += [f"        (adjacent dims merged first while their product stays <= max_dim"
               f"{condition}:", "        a tensor merged into one mode is a vector)"]
        if st.layout != ir.Const("channels_first"):
            word = "" if st.layout == ir.Const("channels_last") else \
                f" when {v(st.layout)} = channels_last"
            eq.append(f"        (a 4-D tensor's dims, N H W C, merged as N C H W{word})")
    eq += ["Q_L, Q_R = the bases of the factors L and R as of the previous step",
          "G'    = Q_L^T G Q_R   (the gradient rotated into the basis)"]
    # V stays as accumulated (the next step averages it); a bias correction is V_hat's
    read = base._accumulate(opt, eq, "G' * G'", "V", nums=nums, hat=True)
    eq[-1 - len(base._bias_correction(nums, "curvature", "V"))] += "   (V kept in the basis)"
    root = nums.matrix or Root("1")
    if root.exponent == "1":  # P = V itself (length none)
        root = Root(None, root.inside, root.after, root.floor)
    m = base._momentum(opt, eq, nums)
    m = "G" if m == "g" else m
    eq.append(f"M'    = Q_L^T {m} Q_R   (the value rotated into the basis)")
    p = base._preconditioner(root, read)
    what = "sign(M')" if opt.length.kind == "eigen_sign" else "M'"
    eq.append(f"D'    = {what} / ({p})" + ("   (0 where that is 0)"
                                           if not (root.inside or root.after or root.floor) else ""))
    eq.append("d     = Q_L D' Q_R^T   (rotated back)")
    eq.append(f"L     = {beta} * L + (1 - {beta}) * G G^T   (after the step; L_0 = 0)")
    eq.append(f"R     = {beta} * R + (1 - {beta}) * G^T G")
    every = f"every {v(st.every)} steps" if st.every is not None else "every step"
    if st.refresh == ir.Const("eigh"):
        eq.append(f"Q_L, Q_R = the eigenvectors of L and R ({every}, after the step)")
    else:
        eq.append(f"Q     = qr(L Q) for L's basis Q (R's alike), {every} after the step: one "
                  "power-iteration step,")
        eq.append("        columns sorted by diag(Q^T L Q) descending, V's coordinates "
                  "permuted alike; the QR in float32")
    eq.append("        (the first step: no basis yet, d = 0; L and R gathered, Q_L and Q_R "
              "their eigenvectors)")
    eq += base._clip(opt)
    eq.append(f"theta = theta - {lr} * d")
    return eq
