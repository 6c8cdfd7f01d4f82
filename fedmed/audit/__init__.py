"""Empirical privacy audits: what an attacker could actually learn, set beside what the
ledger claims.

- ``bounds``: the one-run canary audit's lower bound on epsilon (Steinke, Nasr &
  Jagielski, NeurIPS 2023), from an attacker's guesses about which canaries were trained on.
- ``canaries``: canaries for a site, each included in its training data with probability
  1/2, and the attacker's scores and guesses from the final model.
- ``membership``: a membership-inference attack run by a site on its own model: training
  versus validation patients, as an attack AUC with its interval.
- ``run``: ``fedmed audit``: a scenario's federated run, in one process, with canaries at one
  site, and its report.

A lower bound is evidence, not a guarantee: a bound above the ledger's epsilon proves the
claim wrong (at the stated confidence); a bound below it proves nothing about the claim,
because a stronger attack could find more. docs/privacy-report.md explains.
"""

# Beside a site's ledger: the audit's results for that site (its membership attacks, and the
# canary audit where it held the canaries); fedmed-report shows them with the ledger.
SITE_AUDIT_FILE = "privacy-audit.json"
