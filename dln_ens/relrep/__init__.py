"""Relative-representation matrices (DeePEn): token surfaces -> anchors -> one matrix per member.

    from dln_ens.relrep.build import build_matrices        # also `dln_ens.build_matrices`
    from dln_ens.relrep.store import load_matrices         # -> ({member: RelRepMatrix}, Anchors)
    from dln_ens.relrep.vocab import token_surfaces
`dln-ens mat` / `sh sh/mat.sh` run `dln_ens.relrep.cli.build_all` on a config.
"""
