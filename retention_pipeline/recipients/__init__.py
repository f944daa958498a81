"""What the people we email, and their mailboxes, tell us: what a mailbox is (addresses.py),
who must not be emailed again (suppressions.py: unsubscribes, bounces, complaints) and what
happened to what was sent (delivery.py: Resend's webhook events).

Plain Python over SQLAlchemy, no Dagster: the audience, the send and the web service read them.
"""
