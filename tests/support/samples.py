"""Sample documents shared by test modules."""

from __future__ import annotations

PUMP_YAML = """\
- name: pump pressure burst
  description: three high-pressure readings within a minute, per pump
  enabled: true
  trigger:
    type: event
    match: {"prefect.resource.id": "pump.*"}
    expect: ["pump.pressure.high"]
    for_each: ["prefect.resource.id"]
    posture: Reactive
    threshold: 3
    within: 60
  actions:
    - type: call-webhook
      url: http://127.0.0.1:9000/hooks/pager
      headers: {"X-Team": "ops"}
      payload: '{"text": "{{ automation.name }}: {{ event.resource.id }}"}'
      secret: "whsec_abc"
"""
