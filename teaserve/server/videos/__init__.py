"""The OpenAI Videos API: jobs that outlive the process."""
