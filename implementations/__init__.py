"""Built-in MoE backends. Each module registers its backend(s) with moebench.registry on import.

Shape legend used across implementations/:
  T tokens, D model dim, F expert hidden dim, E experts, K experts per token (top-k),
  S = T*K routed (token, expert) slots.  w1_EDF2 = [gate | up] stacked on the last dim.
"""
