"""Email over SMTP (smtplib): one multipart message, plain text and HTML."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from app.config import Settings
from app.notify.compose import Mail


def build_message(mail: Mail, *, sender: str, to: str) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = mail.subject
    message["From"] = sender
    message["To"] = to
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="agentloop")
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    message.set_content(mail.text)
    message.add_alternative(mail.html, subtype="html")
    return message


def send_mail(settings: Settings, mail: Mail, *, to: str) -> None:
    """Hand one message to the SMTP server. Raises OSError or smtplib.SMTPException."""
    message = build_message(mail, sender=settings.smtp_from, to=to)
    with smtplib.SMTP(
        settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout
    ) as smtp:
        smtp.send_message(message)
