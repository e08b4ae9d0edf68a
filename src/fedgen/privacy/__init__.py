"""Formal differential privacy (record-level DP-SGD in every silo, client-level DP-FedAvg at the server) and the
audits that measure leakage. Every number fedgen prints about privacy comes from here: an (epsilon, delta) from a
named accountant with its inputs, or a measured attack."""
