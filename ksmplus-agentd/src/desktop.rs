//! Desktop-entry wrapping: run a program from the menu under the shim (issue 5).
