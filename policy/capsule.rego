# Soma Mesh capsule approval policy: which installs need an approver first.
#
# Operators may edit this file (or point SOMA_CAPSULE_POLICY_FILE at a copy): every Capsule
# replica reloads it within a few seconds of a change, and keeps the last good version if the
# new one does not compile (the error is logged with the file name).
#
# Input, built by services/capsule/policy.py for every install that is not already in place:
#   tenant       {"id": "acme", "enterprise_mode": false}     the tenant installing
#   capsule      {"name": "hello", "tenant": "tools", "visibility": "PUBLIC"}
#   version      "1.2.0"
#   permissions  ["network", "filesystem.read"]                what that version requests
#   requester    "key:<key id>" | "user:<sub>"
#   publisher    "tools"                                       the publishing tenant
# Output: `decision` = {"required": bool, "reason": string}; the reason is shown to approvers
# (Approval.policy_reason). Anything else (undefined) requires an approval: fail closed.
# (Strings are built with concat: this rego-cpp's sprintf quotes rule values.)
package soma.capsule.approval

import rego.v1

# Permissions an approver must see before a capsule gets them. A permission also counts when it
# refines one of these (`network.outbound` refines `network`).
sensitive := {"network", "filesystem.write", "process.exec", "secrets.read"}

sensitive_requested := sort([p |
	some p in input.permissions
	some s in sensitive
	refines(p, s)
])

refines(p, s) if p == s

refines(p, s) if startswith(p, concat("", [s, "."]))

from_another_tenant if input.publisher != input.tenant.id

default decision := {"required": false, "reason": "no sensitive permission requested"}

decision := {"required": true, "reason": permission_reason} if {
	count(sensitive_requested) > 0
} else := {"required": true, "reason": enterprise_reason} if {
	input.tenant.enterprise_mode
	from_another_tenant
}

permission_reason := concat("", ["requests sensitive permission ", sensitive_requested[0]]) if {
	count(sensitive_requested) == 1
}

permission_reason := concat("", [
	"requests sensitive permissions ",
	concat(", ", sensitive_requested),
]) if {
	count(sensitive_requested) > 1
}

enterprise_reason := concat("", [
	"tenant ", input.tenant.id, " is in enterprise mode and capsule ", input.capsule.name,
	" is published by another tenant (", input.publisher, ")",
])
