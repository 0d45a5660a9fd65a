"""mat-lightning."""
