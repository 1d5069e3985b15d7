"""The compatibility report: assembled from the measurements, rendered as Markdown, JSON or HTML."""
