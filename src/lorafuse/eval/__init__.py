"""Evaluation: answer-token loss and exact match per task, summaries and reports."""
