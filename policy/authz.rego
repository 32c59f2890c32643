# Soma Mesh authorization policy: which roles (and key scopes) may call which method.
#
# Operators may edit this file (or point SOMA_POLICY_FILE at a copy): every service reloads it
# within a few seconds of a change, and keeps the last good version if the new one does not
# compile (the error is logged with the file name).
#
# Input, built by services/common/auth/authz.py for every non-public call:
#   subject  "key:<key id>" | "user:<sub>"       tenant  "acme"
#   roles    ["admin", ...]                        scopes  ["*"] | ["gateway:read", ...] | []
#   method   "/soma.gateway.v1.GatewayService/GetSession"
#   service  "gateway"    verb  "GetSession"     read  true for Get*/List*/Stream*/Tail*/Export*/Verify*
# (Strings are built with concat: this rego-cpp's sprintf quotes rule values.)
# Output: `decision` = {"allow": bool, "reason": string}. Anything else (undefined) is a denial.
#
# Decisions are cached on (method, roles, scopes). A rule that reads input.subject or
# input.tenant makes the cache include them too (the engine looks for those names in this file).
# Tenant isolation and ownership (a member's own keys, another tenant's capsules) are checked by
# the services, not here: this policy decides which kinds of callers may call a method at all.
# Public methods (GetHealth, GetVersion, IssueToken, GetJwks, health, reflection) never get here.
package soma.authz

import rego.v1

# Who may do what, as groups of tenant roles. platform_admin may call everything (below).
everyone := {"admin", "member", "approver", "auditor"} # the reads
users := {"admin", "member", "approver"} # day-to-day writes: sessions, own keys, installs
approvers := {"admin", "approver"}
auditors := {"admin", "auditor"}
admins := {"admin"}
platform_only := set() # platform_admin alone

# Every method of the contract that needs a caller, by service and verb. A method missing here
# is denied, so a new RPC stays closed until someone decides who may call it.
methods := {
	"gateway": {
		"CreateSession": users,
		"GetSession": everyone,
		"ListSessions": everyone,
		"CloseSession": users,
		"SendMessage": users,
		"ListMessages": everyone,
		"StreamSessionEvents": everyone,
		"GetQueueStats": everyone,
	},
	"keys": {
		# self-service: members manage the keys they own (ownership is checked by the service)
		"CreateApiKey": users,
		"GetApiKey": everyone,
		"ListApiKeys": everyone,
		"UpdateApiKey": users,
		"RevokeApiKey": users,
		"RotateApiKey": users,
		"CreateTenant": platform_only,
		"GetTenant": everyone,
		"ListTenants": everyone,
		"UpdateTenant": admins,
		"CreateRoleBinding": admins,
		"GetRoleBinding": everyone,
		"ListRoleBindings": everyone,
		"DeleteRoleBinding": admins,
	},
	"audit": {
		"GetAuditEvent": auditors,
		"ListAuditEvents": auditors,
		"GetRetentionPolicy": auditors,
		"UpdateRetentionPolicy": admins,
		"TailAuditEvents": auditors,
		"VerifyAuditChain": auditors,
		"ExportAuditEvents": auditors,
	},
	"capsule": {
		"GetCapsule": everyone,
		"ListCapsules": everyone,
		"GetCapsuleVersion": everyone,
		"ListCapsuleVersions": everyone,
		"GetPublisherKey": everyone,
		"ListPublisherKeys": everyone,
		"GetInstallation": everyone,
		"ListInstallations": everyone,
		"GetApproval": everyone,
		"ListApprovals": everyone,
		"VerifyCapsuleVersion": everyone,
		"RegisterPublisherKey": admins,
		"RevokePublisherKey": admins,
		"PublishCapsule": admins,
		"YankCapsuleVersion": admins,
		"InstallCapsule": users,
		"UninstallCapsule": users,
		"ApproveCapsule": approvers,
		"RejectCapsule": approvers,
	},
}

default decision := {"allow": false, "reason": "denied: no rule of the authorization policy allowed this call"}

decision := deny(unknown_method_reason) if {
	not known_method
} else := deny(role_reason) if {
	not role_allowed
} else := deny(scope_reason) if {
	not scope_allowed
} else := {"allow": true, "reason": concat(" ", [roles_text, "may call", method_name])}

deny(reason) := {"allow": false, "reason": reason}

method_name := trim_prefix(input.method, "/")

known_method if methods[input.service][input.verb]

allowed_roles := methods[input.service][input.verb] | {"platform_admin"}

role_allowed if {
	some role in input.roles
	role in allowed_roles
}

# No scopes means everything the roles allow (soma.keys.v1.ApiKey.scopes); "*" likewise.
# "<service>:read" allows the read methods of a service, "<service>:write" the others; the
# contract's spelling "<service>.read" is accepted too.
scope_allowed if count(input.scopes) == 0

scope_allowed if "*" in input.scopes

scope_allowed if {
	some scope in input.scopes
	scope in {concat(":", [input.service, access]), concat(".", [input.service, access])}
}

access := "read" if input.read

access := "write" if not input.read

roles_text := concat(" ", ["role", concat(", ", sort(input.roles))]) if count(input.roles) == 1

roles_text := concat(" ", ["roles", concat(", ", sort(input.roles))]) if count(input.roles) > 1

roles_text := "a caller with no roles" if count(input.roles) == 0

needed_roles := concat(" or ", sort(methods[input.service][input.verb])) if {
	count(methods[input.service][input.verb]) > 0
}

needed_roles := "platform_admin" if count(methods[input.service][input.verb]) == 0

unknown_method_reason := concat("", [
	method_name,
	" is not listed in the authorization policy, so nobody may call it;",
	" add it to `methods` in the policy file",
])

role_reason := concat("", [roles_text, " may not call ", method_name, "; it needs ", needed_roles])

scope_reason := concat("", [
	"the credential's scopes (", concat(", ", sort(input.scopes)), ") do not allow ", method_name,
	"; it needs scope ", input.service, ":", access, " (or *)",
])
