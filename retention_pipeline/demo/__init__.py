"""Deterministic demo data for the app tables the pipeline watches.

`seed_demo` fills a NestJS + Stripe style schema (`users`, `events`, `sessions`,
`subscriptions`) with a SaaS history, generated inside PostgreSQL, set-based, so a million users
take minutes. Same arguments give byte-identical rows.

Every user gets one habit (shares for users old enough to show it; recent signups that cannot
yet fade, churn or come back are daily or weekly instead, as new users are):

- daily (22%): active on most days (85%).
- weekly (28%): active on one or two preferred weekdays, rarely otherwise.
- fading (14%): used the product steadily, then faded. Half decayed to nothing over one to three
  weeks and have been silent for at least 8 days (dormant for 7+ days); half kept up until about
  a week ago and have logged in only once in the last week (auth sessions down 80%+ against
  their average week over the four weeks before).
- churned (14%): active for at least a few weeks, then silent for 30 days or more; most
  canceled their subscription a few days after going quiet.
- never_activated (12%): signed up and did nothing; half logged in once right after signing up.
- resurrected (10%): active, then gone for 10 to 20 days, back within the last 1-3 days.

On top of the habits, the re-engagement email works, with a known effect (`EmailEffect`): a
user the loop's holdout draw puts in the treatment who has been away a week, and would not come
back on their own, comes back two to five days after the email with probability 0.5.

Signups follow exponential growth (recent days see about 5x more than the start of the window),
at plausible local times in a handful of timezones (a few users have none, as in real apps).
"""

from retention_pipeline.demo.seed import DemoSummary, EmailEffect, seed_demo

__all__ = ["DemoSummary", "EmailEffect", "seed_demo"]
