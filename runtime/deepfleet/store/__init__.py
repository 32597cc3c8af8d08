"""Model weights in object storage: fetch a revision to a local tier (verified, resumable), sync between stores."""
