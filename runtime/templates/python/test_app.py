"""Tests of the handler in app.py, in plain Python: `python3 -m unittest`
(no component build, no Kafka). `weir_testing` stands in for the modules
componentize-py generates; import it before `app`."""

import unittest

import weir_testing as weir
from weir_testing import Err, HandlerError_Fatal, HandlerError_Retriable, Level, event

import app


def handle(ev):
    return app.WitWorld().handle(ev)


class HandlerTest(unittest.TestCase):
    def setUp(self):
        weir.reset(output_topic="greetings.answered")

    def test_an_event_is_echoed_to_the_output_topic(self):
        [out] = handle(event('{"name": "Ada"}', event_type="greeting.sent"))
        self.assertEqual(out.topic, "greetings.answered")
        self.assertEqual(out.event_type, "greeting.sent.echoed")
        self.assertEqual(out.content_type, "application/json")
        self.assertEqual(out.payload, b'{"name": "Ada"}')
        self.assertEqual(out.headers[0].key, "attempt")
        self.assertEqual(out.headers[0].value, b"1")

    def test_the_fail_marker_is_fatal(self):
        with self.assertRaises(Err) as raised:
            handle(event('{"name": "FAIL"}'))
        self.assertIsInstance(raised.exception.value, HandlerError_Fatal)
        self.assertIn("FAIL", raised.exception.value.value)

    def test_the_retry_marker_is_retriable_until_succeed_on_attempt(self):
        weir.config["succeed_on_attempt"] = "2"
        with self.assertRaises(Err) as raised:
            handle(event('{"name": "RETRY"}', attempt=1))
        self.assertIsInstance(raised.exception.value, HandlerError_Retriable)
        self.assertEqual(weir.logged[0][0], Level.WARN)
        [out] = handle(event('{"name": "RETRY"}', attempt=2))
        self.assertEqual(out.headers[0].value, b"2")


if __name__ == "__main__":
    unittest.main()
