"""Which reply answers which message: the node the server sent it to, and the message id the grid gave it.

Flower's grid names every message it pushes with a fresh id (a uuid in the
simulation engine, the message's object id on a SuperLink) and a ClientApp's
reply names that id in ``reply_to_message_id``. The server takes a reply only
as the answer to the message of its exchange (a round's train instructions,
its evaluations, the identity queries, a provisioning step, the final sync)
that went to the reply's node under the id the reply names. A reply from a
node not asked, a second answer, and a reply naming another id are refused:
the last is a reply to another message (an earlier round's, replayed
verbatim when the fast state has not moved since) or a forgery.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import Message

NOT_ASKED = "not asked for"
SECOND_REPLY = "a second reply"
SHOWN_ID_CHARS = 16  # of a message id in a reason: enough to find it, bounded whatever a reply names


class Exchange:
    """The messages of one exchange, by destination node, and the nodes that have answered so far.

    Parameters
    ----------
    sent : Mapping[int, str]
        The message id the grid gave the message sent to each node ("" where
        it gave none: a reply must then name none).
    """

    def __init__(self, sent: Mapping[int, str]) -> None:
        self.sent = dict(sent)
        self.answered: set[int] = set()

    @classmethod
    def of(cls, messages: Iterable[Message]) -> Exchange:
        """The exchange of ``messages``, once the grid has sent them (and so given them their ids)."""
        return cls({message.metadata.dst_node_id: message.metadata.message_id for message in messages})

    def problem(self, reply: Message) -> str | None:
        """Why ``reply`` answers no message of the exchange (None: it answers its node's, now answered).

        The phrases read after "unexpected reply: " and before where it came
        (" in this round", ...).
        """
        node = reply.metadata.src_node_id
        if node not in self.sent:
            return NOT_ASKED
        named, expected = reply.metadata.reply_to_message_id, self.sent[node]
        if named != expected:
            return f"a replay or forgery (it names {shown(named)}, not the one node {node} was sent)"
        if node in self.answered:
            return SECOND_REPLY
        self.answered.add(node)
        return None


def shown(message_id: str) -> str:
    """The message a reply names, as a reason shows it: its id quoted, cut to :data:`SHOWN_ID_CHARS` characters."""
    if not message_id:
        return "no message"
    cut = message_id[:SHOWN_ID_CHARS] + ("..." if len(message_id) > SHOWN_ID_CHARS else "")
    return f"message {cut!r}"
