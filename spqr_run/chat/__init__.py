"""The terminal chat: conversation state, slash commands, input, rendering and the REPL loop."""

from spqr_run.chat.conversation import Conversation, ConversationError, Message
from spqr_run.chat.session import ChatSession, Reply

__all__ = ["ChatSession", "Conversation", "ConversationError", "Message", "Reply"]
