"""Which users, and which send-log rows, one send run of a loop handles when the loop is sent by
several runs at once (`email.send_shards`).

A user belongs to the shard their id hashes into: PostgreSQL's `hashtextextended`, the hash its
hash partitioning relies on, so it stays the same across versions and machines. The shard that
claimed a row is stored with it (`email_send_log.send_shard`), and a run sends the batches its
shard claimed: a batch, made of one shard's users, always goes out whole from one run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`, numbered from 0 as the send job's `shard` partitions are."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count} does not exist")

    @property
    def params(self) -> dict[str, int]:
        """The bind parameters of `user_in_shard` and `row_in_shard`."""
        return {"shard": self.index, "shard_count": self.count}

    def __str__(self) -> str:
        return f"shard {self.index} of {self.count}"


WHOLE_LOOP = Shard(0, 1)
"""The one shard of a loop sent by a single run (`email.send_shards: 1`)."""


def user_in_shard(user_id: str) -> str:
    """SQL that is true when the user id expression `user_id` hashes into the shard bound as
    `:shard` of `:shard_count` (bind `Shard.params`). The hash is a signed bigint: the double
    modulo keeps shards non-negative and even."""
    return (
        f"mod(mod(hashtextextended({user_id}, 0), :shard_count) + :shard_count, :shard_count)"
        " = :shard"
    )


def row_in_shard(send_shard: str) -> str:
    """SQL that is true when a send-log row, whose claiming shard is the expression
    `send_shard`, is the bound shard's to send. After `email.send_shards` shrank, rows claimed
    by a shard that no longer exists fall to the shard of the same remainder."""
    return f"mod({send_shard}, :shard_count) = :shard"
