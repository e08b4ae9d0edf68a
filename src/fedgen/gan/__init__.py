"""PGA: the party (discriminator) side and the generator side of private generator aggregation."""
