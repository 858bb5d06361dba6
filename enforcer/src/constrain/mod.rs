//! Constrain: carries out the rewrites of a CONSTRAIN decision on a request (redaction, JSON and header changes,
//! dropping declared tools) and reports what changed by location only. Pure functions over plain data.
