"""`flower`: a SuperLink on the coordinating machine and one SuperNode per silo, with TLS and SuperNode
authentication by default (flwr 1.41): keys (certs.py), the SuperLink (superlink.py), a silo's SuperNode
(supernode.py), submitting and following a run (submit.py), and all of it on one machine (local.py)."""
