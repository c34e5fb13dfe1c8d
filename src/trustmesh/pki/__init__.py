"""The mesh PKI: a root and an issuing CA, node certificates, revocation and CRLs."""
