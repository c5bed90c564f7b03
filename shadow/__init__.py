"""The shadow path: sampling, replay queue, reference scoring, comparison, metrics."""
